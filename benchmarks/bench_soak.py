"""Soak benchmark: one long `U2ATrainer` run with frequent refreshes, watched for slow growth.

The run: the tiny offline model (`benchmarks/_common.py` preset `tiny`) with LoRA (r 8, all linear layers: the output
embedding stays frozen, so in-training scores apply), `--steps` optimizer steps, a refresh every `--reweight-steps`
steps from step 0 (`reweight_warmup_steps=0`), `in_training_scores=True`, no checkpoints. A callback samples every
`--sample-every` steps: the resident set (VmRSS from /proc/self/status), the number of live Python objects
(`gc.get_objects()`), the refresh records so far, the sizes and rows of the trace files the refresh writes
(`u2a_trace.jsonl`, `u2a_refreshes.jsonl`) and the wall time of the steps in between.

Reported:

- RSS growth after warm-up: the last sample against the first sample at or after `--warmup-steps` (%), and the slope
  of a least-squares line through the samples after warm-up (MiB per 1,000 steps). Target: ≤ 5 %.
- Trace bytes per refresh: the growth of each trace file over the first and the second half of the run divided by
  the refreshes written in between, and per row (a `u2a_trace.jsonl` row is one negative of one refresh, so its rows
  per refresh follow the selection size; linear growth means constant bytes per row). Also the size of the U2A state
  in the newest checkpoint (`--save-steps`, the newest one kept).
- Refresh time: the median CPU time (`time.process_time` around each refresh) and wall time (`refresh_seconds` of
  the refresh record) of the refreshes in the first quarter of the run against the last quarter (the initial pass,
  which scores every negative, is left out), and the refreshes' share of the CPU time of each window between two
  samples (refresh CPU over the rest of the window's CPU): load from other processes on a shared machine slows
  refreshes and training steps alike, so a creep of the refresh itself shows in the share.

Usage:
    python benchmarks/bench_soak.py [--steps 2000] [--reweight-steps 10] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

TRACE_FILES = ("u2a_trace.jsonl", "u2a_refreshes.jsonl")
RSS_TARGET = 0.05


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps of the run")
    parser.add_argument("--reweight-steps", type=int, default=10, help="steps between two refreshes")
    parser.add_argument("--sample-every", type=int, default=100, help="steps between two samples")
    parser.add_argument(
        "--warmup-steps", type=int, default=200, help="RSS growth is measured from the first sample at or after this"
    )
    parser.add_argument(
        "--save-steps", type=int, default=500, help="steps between two checkpoints (the newest kept); 0: none"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="per-device batch size")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row")
    parser.add_argument("--negatives", type=int, default=256, help="negatives in the training set")
    parser.add_argument("--retain", type=int, default=64, help="retain rows (label=True) in the training set")
    parser.add_argument("--pairs", type=int, default=32, help="alignment pairs")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (all linear layers, alpha = 2 rank)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--workdir", default=None, help="where the model and the run output go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results as JSON to this path")
    parser.add_argument("--plot", default=None, help="draw RSS and refresh time against the step as a PNG here")
    args = parser.parse_args(argv)
    for name in ("steps", "reweight_steps", "sample_every", "batch_size", "seq_len", "negatives", "pairs", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.save_steps < 0:
        parser.error(f"--save-steps must be ≥ 0 (0: no checkpoints), got {args.save_steps}")
    if args.sample_every > args.steps:
        parser.error(f"--sample-every {args.sample_every} is more than --steps {args.steps}: no sample would be taken")
    return args


def rss_mib() -> float:
    """Resident set of this process, MiB (VmRSS of /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status (the soak benchmark needs Linux)")


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def _lines(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def make_sampler(trainer, every: int, samples: list, checkpoints: list, refresh_cpu: dict):
    """A callback that appends a sample to `samples` after every `every`-th optimizer step (and the last one), and the
    step and size of the U2A state (`u2a_state.json` + `u2a_state.safetensors`) of each checkpoint to
    `checkpoints`. It also times each refresh's CPU time into `refresh_cpu` (refresh index -> seconds): the wall time
    the refresh records counts the load of other processes on a shared machine too."""
    from transformers import TrainerCallback

    from trl_u2a.safe_state import STATE_JSON, STATE_TENSORS

    output_dir = trainer.args.output_dir
    # The refresh controller behind the trainer's callback: it runs the scheduled refreshes and holds their history
    refresh = trainer.refresh_callback.controller
    untimed = refresh.refresh

    def timed_refresh(step):
        started = time.process_time()
        record = untimed(step)
        refresh_cpu[record["refresh"]] = time.process_time() - started
        return record

    refresh.refresh = timed_refresh

    class Sampler(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step % every and step != state.max_steps:
                return
            now, now_cpu = time.perf_counter(), time.process_time()
            gc.collect()
            records = [r for r in refresh.history if r.get("refresh") is not None]
            samples.append(
                {
                    "step": step,
                    "rss_mib": rss_mib(),
                    "python_objects": len(gc.get_objects()),
                    "refreshes": len(records),
                    "history_len": len(refresh.history),
                    "fresh_scores": len(refresh.fresh_scores),
                    "log_history_len": len(state.log_history),
                    "trace_bytes": {name: _size(os.path.join(output_dir, name)) for name in TRACE_FILES},
                    "trace_rows": {name: _lines(os.path.join(output_dir, name)) for name in TRACE_FILES},
                    # What the refresh history would weigh as JSON (every refresh keeps its full weight vector)
                    "history_json_bytes": len(json.dumps(refresh.history)),
                    "window_wall_s": now - self.last,
                    "window_cpu_s": now_cpu - self.last_cpu,
                }
            )
            self.last, self.last_cpu = time.perf_counter(), time.process_time()

        def on_save(self, args, state, control, **kwargs):
            directory = os.path.join(output_dir, f"checkpoint-{state.global_step}")
            size = sum(_size(os.path.join(directory, name)) for name in (STATE_JSON, STATE_TENSORS))
            checkpoints.append({"step": state.global_step, "u2a_state_bytes": size})

    return Sampler()


def build_trainer(args, model_path, data, output_dir):
    from trl_u2a import U2AConfig, U2ATrainer

    kwargs = common.training_kwargs(output_dir, args.batch_size, args.seq_len)
    if args.save_steps:
        # The newest checkpoint only: what is measured is the size of its U2A state, not the disk
        kwargs.update(save_strategy="steps", save_steps=args.save_steps, save_total_limit=1)
    config = U2AConfig(
        **kwargs,
        max_steps=args.steps,
        learning_rate=1e-4,
        logging_steps=args.sample_every,
        dataloader_num_workers=0,
        reweight_steps=args.reweight_steps,
        reweight_warmup_steps=0,
        in_training_scores=True,
        # The end-of-run plots read the whole history once, after the last sample
        save_refresh_plots=False,
    )
    return U2ATrainer(
        model=model_path,
        args=config,
        train_dataset=data["unpaired"],
        alignment_dataset=data["pairs"],
        peft_config=common.lora_config(args.rank),
    )


def _slope(xs, ys) -> float:
    """Least-squares slope of `ys` against `xs`."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def summarise(samples: list[dict], records: list[dict], checkpoints: list[dict], steps: int, warmup_steps: int) -> dict:
    """RSS growth after warm-up, trace bytes per refresh (first and second half), the checkpointed U2A state's growth
    per refresh and the refresh time (first and last quarter) from the samples, refresh records and checkpoint sizes of
    one run."""

    def refreshes_at(step):
        return sum(1 for r in records if r["step"] <= step)

    after = [s for s in samples if s["step"] >= warmup_steps] or samples[-1:]
    base, last = after[0], after[-1]
    rss = {
        "warmup_step": base["step"],
        "at_warmup_mib": base["rss_mib"],
        "last_mib": last["rss_mib"],
        "max_after_warmup_mib": max(s["rss_mib"] for s in after),
        "growth_pct": 100 * (last["rss_mib"] / base["rss_mib"] - 1),
        "slope_mib_per_1000_steps": 1000 * _slope([s["step"] for s in after], [s["rss_mib"] for s in after]),
        "python_objects_at_warmup": base["python_objects"],
        "python_objects_last": last["python_objects"],
    }
    rss["within_target"] = rss["growth_pct"] <= 100 * RSS_TARGET

    # A trace row is one negative of one refresh (scored or selected), so rows per refresh follow the selection; a
    # trace that grows linearly has constant bytes per row, and per refresh record
    trace = {}
    halves = ((samples[0], samples[len(samples) // 2]), (samples[len(samples) // 2], samples[-1]))
    for name in TRACE_FILES:
        entry = {"bytes_total": samples[-1]["trace_bytes"][name], "rows_total": samples[-1]["trace_rows"][name]}
        for half, (a, b) in zip(("first_half", "second_half"), halves):
            grown = b["trace_bytes"][name] - a["trace_bytes"][name]
            rows = b["trace_rows"][name] - a["trace_rows"][name]
            refreshes = b["refreshes"] - a["refreshes"]
            entry[f"bytes_per_refresh_{half}"] = grown / refreshes if refreshes else None
            entry[f"rows_per_refresh_{half}"] = rows / refreshes if refreshes else None
            entry[f"bytes_per_row_{half}"] = grown / rows if rows else None
        first, second = entry["bytes_per_row_first_half"], entry["bytes_per_row_second_half"]
        entry["bytes_per_row_second_over_first"] = second / first if first and second else None
        trace[name] = entry

    checkpoint = {"saved": checkpoints}
    if len(checkpoints) >= 2:
        checkpoint["u2a_state_bytes_per_refresh"] = _slope(
            [refreshes_at(c["step"]) for c in checkpoints], [c["u2a_state_bytes"] for c in checkpoints]
        )

    # The refresh history keeps every refresh's full weight vector: memory and checkpoint state linear in refreshes
    history = {
        "json_bytes_last": samples[-1]["history_json_bytes"],
        "json_bytes_per_refresh": _slope([s["refreshes"] for s in samples], [s["history_json_bytes"] for s in samples])
        if len(samples) >= 2
        else None,
    }

    later = [r for r in records if r["refresh"] > 0]
    quarter = steps / 4
    refresh = {
        "count": len(records),
        "initial_pass_s": records[0]["refresh_seconds"] if records else None,
        "initial_pass_cpu_s": records[0]["refresh_cpu_seconds"] if records else None,
        "num_scored_in_training_median": common.median([r["num_scored_in_training"] for r in later]),
        "num_scored_median": common.median([r["num_scored"] for r in later]),
    }
    for clock, key in (("wall", "refresh_seconds"), ("cpu", "refresh_cpu_seconds")):
        first_q = [r[key] for r in later if r["step"] <= quarter]
        last_q = [r[key] for r in later if r["step"] > steps - quarter]
        refresh[f"{clock}_first_quarter_median_s"] = common.median(first_q)
        refresh[f"{clock}_last_quarter_median_s"] = common.median(last_q)
        refresh[f"{clock}_last_over_first"] = (
            common.median(last_q) / common.median(first_q) if first_q and last_q else None
        )
        refresh["first_quarter_count"], refresh["last_quarter_count"] = len(first_q), len(last_q)
    # Load from other processes slows the refreshes and the training steps alike (CPU time too, through shared caches
    # and cores); the refreshes' CPU time over the rest of the same window's CPU time does not move with it. A refresh
    # after step s runs before the sample at step s (the trainer's callback comes first).
    shares = []
    for a, b in zip([None, *samples], samples):
        start = a["step"] if a else 0
        spent = sum(r["refresh_cpu_seconds"] for r in later if start < r["step"] <= b["step"])
        shares.append({"step": b["step"], "share": spent / (b["window_cpu_s"] - spent)})
    refresh["cpu_share_of_training_by_window"] = shares
    first_q = [w["share"] for w in shares if w["step"] <= quarter]
    last_q = [w["share"] for w in shares if w["step"] > steps - quarter]
    refresh["cpu_share_first_quarter_median"] = common.median(first_q)
    refresh["cpu_share_last_quarter_median"] = common.median(last_q)
    return {"rss": rss, "trace": trace, "checkpoint": checkpoint, "history": history, "refresh": refresh}


def plot(samples: list[dict], records: list[dict], path: str, warmup_steps: int) -> None:
    """Two panels against the optimizer step: RSS with the +5 % line over the first sample after warm-up, and each
    refresh's CPU time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    warmup = next((s for s in samples if s["step"] >= warmup_steps), None)
    later = [r for r in records if r["refresh"] > 0]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), dpi=120, sharex=True)
    every = samples[1]["step"] - samples[0]["step"] if len(samples) > 1 else samples[0]["step"]
    top.plot([s["step"] for s in samples], [s["rss_mib"] for s in samples], "o-", label=f"RSS, every {every} steps")
    if warmup is not None:
        top.axhline(
            warmup["rss_mib"] * (1 + RSS_TARGET),
            color="tab:red",
            linestyle="--",
            linewidth=1,
            label=f"target: +{100 * RSS_TARGET:.0f} % over step {warmup['step']}",
        )
    low, high = min(s["rss_mib"] for s in samples), max(s["rss_mib"] for s in samples)
    top.set_ylim(low * 0.9, high * 1.1)  # ±10 % around the samples: a 5 % growth is visible, noise is not magnified
    top.set_ylabel("resident memory (MiB)")
    top.legend(loc="lower right")
    top.grid(alpha=0.3)
    bottom.plot([r["step"] for r in later], [r["refresh_cpu_seconds"] for r in later], ".", color="tab:orange")
    bottom.set_ylim(bottom=0)
    bottom.set_ylabel("refresh CPU time (s)")
    bottom.set_xlabel("optimizer step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(alpha=0.3)
    cadence = later[1]["step"] - later[0]["step"] if len(later) > 1 else None
    fig.suptitle(f"Soak: {samples[-1]['step']:,} steps" + (f", a refresh every {cadence} steps" if cadence else ""))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def print_report(result: dict) -> None:
    print(
        f"\n{'step':>6s} {'RSS MiB':>8s} {'objects':>9s} {'refreshes':>9s} {'trace KiB':>10s} {'ckpt state KiB':>14s} "
        f"{'history KiB':>11s} {'window cpu s':>12s}"
    )
    saved = {c["step"]: c["u2a_state_bytes"] for c in result["summary"]["checkpoint"]["saved"]}
    for s in result["samples"]:
        state = max((step for step in saved if step <= s["step"]), default=None)
        print(
            f"{s['step']:6d} {s['rss_mib']:8.1f} {s['python_objects']:9d} {s['refreshes']:9d} "
            f"{s['trace_bytes']['u2a_trace.jsonl'] / 1024:10.1f} {saved[state] / 1024 if state else 0:14.1f} "
            f"{s['history_json_bytes'] / 1024:11.1f} {s['window_cpu_s']:12.1f}"
        )
    summary = result["summary"]
    rss, refresh = summary["rss"], summary["refresh"]
    print(
        f"\nRSS after warm-up (step {rss['warmup_step']}): {rss['at_warmup_mib']:.1f} -> {rss['last_mib']:.1f} MiB "
        f"({rss['growth_pct']:+.2f} %, slope {rss['slope_mib_per_1000_steps']:+.2f} MiB per 1,000 steps; target "
        f"≤ {100 * RSS_TARGET:.0f} %)"
    )
    for name, t in summary["trace"].items():
        print(
            f"{name}: {t['bytes_total']:,} bytes, {t['rows_total']:,} rows; per refresh "
            f"{t['bytes_per_refresh_first_half']:.0f} / {t['bytes_per_refresh_second_half']:.0f} bytes and "
            f"{t['rows_per_refresh_first_half']:.1f} / {t['rows_per_refresh_second_half']:.1f} rows (first / second "
            f"half); per row {t['bytes_per_row_first_half']:.1f} / {t['bytes_per_row_second_half']:.1f} bytes"
        )
    if "u2a_state_bytes_per_refresh" in summary["checkpoint"]:
        print(
            "checkpoint U2A state: "
            + ", ".join(f"step {step}: {size:,} bytes" for step, size in saved.items())
            + f" ({summary['checkpoint']['u2a_state_bytes_per_refresh']:+,.0f} bytes per refresh)"
        )
    if summary["history"]["json_bytes_per_refresh"] is not None:
        print(
            f"refresh history: {summary['history']['json_bytes_last']:,} bytes as JSON at the end "
            f"({summary['history']['json_bytes_per_refresh']:+,.0f} bytes per refresh)"
        )
    print(
        f"refresh CPU over the training CPU of its window (median): first quarter "
        f"{refresh['cpu_share_first_quarter_median']:.3f}, last quarter {refresh['cpu_share_last_quarter_median']:.3f}"
    )
    for clock in ("cpu", "wall"):
        ratio = refresh[f"{clock}_last_over_first"]
        print(
            f"refresh {clock} time (median): first quarter {refresh[f'{clock}_first_quarter_median_s']:.3f} s, last "
            f"quarter {refresh[f'{clock}_last_quarter_median_s']:.3f} s"
            + (f" (ratio {ratio:.3f})" if ratio is not None else "")
            + f"; {refresh['count']} refreshes"
        )


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_soak_")
    model_path = common.save_model("tiny", os.path.join(workdir, "models"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = common.make_data(tokenizer, args.seq_len, args.negatives, args.retain, args.pairs)
    trainer = build_trainer(args, model_path, data, os.path.join(workdir, "run"))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # a line per refresh; the samples are the report
    samples: list[dict] = []
    checkpoints: list[dict] = []
    refresh_cpu: dict[int, float] = {}
    trainer.add_callback(make_sampler(trainer, args.sample_every, samples, checkpoints, refresh_cpu))
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started
    records = [
        {
            **{k: r[k] for k in ("refresh", "step", "refresh_seconds", "num_scored", "num_scored_in_training")},
            "refresh_cpu_seconds": refresh_cpu[r["refresh"]],
        }
        for r in trainer.refresh_callback.history
        if r.get("refresh") is not None
    ]
    result = {
        "command": "python benchmarks/bench_soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot", "workdir")},
        "machine": common.machine_info(),
        "in_training_scores_active": trainer.refresh_callback.controller.in_training,
        "train_wall_s": elapsed,
        "samples": samples,
        "refreshes": records,
        "summary": summarise(samples, records, checkpoints, args.steps, args.warmup_steps),
    }
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(samples, records, args.plot, args.warmup_steps)
    return result


if __name__ == "__main__":
    main()
