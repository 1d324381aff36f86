"""Scale benchmark: the memory and time of the initial pass and of a short run, from 2,000 to 100,000 negatives.

Each number of negatives runs in a fresh process (`--worker`), so that its peak resident set is its own: the tiny
offline model (`benchmarks/_common.py` preset `tiny`, full fine-tuning), `--seq-len`-token rows (a pool of 256
synthetic rows repeated to N negatives), a `--pairs`-pair alignment set, batch `--batch-size`, `--steps` optimizer
steps, gradient ascent (`ga`: NPO would add the trainer's reference pass over every negative to the build, which
streams alike), the package's refresh defaults. Measured in the worker:

- the resident set once the trainer is built (VmRSS of /proc/self/status), the base of the rises below;
- the rise of the peak resident set (VmHWM, reset through /proc/self/clear_refs just before `train()`) by the end of
  the initial pass (a callback after the refresh callback's `on_train_begin`) and by the end of the run;
- the wall time of the initial pass (`refresh_seconds` of its record) and of `train()`;
- what grows with N outside the pass: the tokenized training data (Arrow, in memory or memory-mapped from the
  datasets cache), the trace files (`u2a_trace.jsonl`: one row per scored or selected negative per refresh;
  `u2a_refreshes.jsonl`), and the weight state.

Reported: a table by N, the per-negative cost (least-squares slopes over N of the initial pass's peak rise, in
bytes, and of its time, in ms), and how flat the pass's peak rise is: its value at the largest N over the one at
5,000 (or the smallest N). Target: ≤ 1.5.

Needs Linux (/proc). Usage:
    python benchmarks/bench_scale.py [--negatives 2000 5000 20000 40000 100000] [--steps 4] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

FLATNESS_TARGET = 1.5
POOL_ROWS = 256


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--negatives", type=int, nargs="+", default=[2000, 5000, 20000, 40000, 100000])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="models and runs go here (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--inline", action="store_true", help="measure in this process (one process for every N: for a smoke test)"
    )
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} line in /proc/self/status (the scale benchmark needs Linux)")


def _reset_peak() -> None:
    """Start VmHWM over at the current resident set (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def make_negatives(tokenizer, n: int, seq_len: int, pairs: int) -> dict:
    """`n` negatives (a pool of synthetic rows of `seq_len` tokens, repeated) and `pairs` alignment pairs."""
    from datasets import Dataset

    data = common.make_data(tokenizer, seq_len, min(n, POOL_ROWS), 0, pairs)
    pool = data["unpaired"]
    reps = -(-n // len(pool))
    negatives = Dataset.from_dict(
        {
            "prompt": (list(pool["prompt"]) * reps)[:n],
            "completion": (list(pool["completion"]) * reps)[:n],
            "label": [False] * n,
        }
    )
    return {"negatives": negatives, "pairs": data["pairs"]}


def measure(n: int, args, workdir: str) -> dict:
    """One run at `n` negatives in this process; the figures of the module docstring."""
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from trl_u2a import U2AConfig, U2ATrainer

    model_path = common.save_model("tiny", os.path.join(workdir, "models"))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = make_negatives(tokenizer, n, args.seq_len, args.pairs)
    output_dir = os.path.join(workdir, f"run_{n}")
    config = U2AConfig(
        **common.training_kwargs(output_dir, args.batch_size, args.seq_len),
        max_steps=args.steps,
        learning_rate=1e-4,
        logging_steps=args.steps,
        dataloader_num_workers=0,
        loss_type="ga",
        save_refresh_plots=False,
    )
    started = time.perf_counter()
    trainer = U2ATrainer(
        model=model_path, args=config, train_dataset=data["negatives"], alignment_dataset=data["pairs"]
    )
    build_s = time.perf_counter() - started
    trainer.remove_callback(PrinterCallback)
    marks = {}

    class AfterInitialPass(TrainerCallback):
        # Added after the refresh callback, so its `on_train_begin` runs once the initial pass is done
        def on_train_begin(self, args, state, control, **kwargs):
            marks["initial_peak_mib"] = _status_mib("VmHWM")

    trainer.add_callback(AfterInitialPass())
    dataset = trainer.train_dataset
    _reset_peak()
    base = _status_mib("VmRSS")
    started = time.perf_counter()
    trainer.train()
    run_s = time.perf_counter() - started
    run_peak = _status_mib("VmHWM")
    history = trainer.refresh_callback.history
    initial = history[0]
    weights = trainer.weight_state
    return {
        "negatives": n,
        "build_s": build_s,
        "rss_after_build_mib": base,
        "initial_pass_peak_rise_mib": marks["initial_peak_mib"] - base,
        "run_peak_rise_mib": run_peak - base,
        "initial_pass_s": initial["refresh_seconds"],
        "initial_pass_scored": initial["num_scored"],
        "run_s": run_s,
        "refreshes": sum(r.get("refresh") is not None for r in history),
        "dataset_bytes": dataset.data.nbytes,
        "dataset_on_disk": bool(dataset.cache_files),
        "trace_bytes": _size(os.path.join(output_dir, "u2a_trace.jsonl")),
        "refreshes_file_bytes": _size(os.path.join(output_dir, "u2a_refreshes.jsonl")),
        "weight_state_bytes": sum(t.nbytes for t in vars(weights).values() if hasattr(t, "nbytes")),
    }


def _slope(xs, ys) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def summarise(rows: list[dict]) -> dict:
    """Per-negative slopes of the initial pass and the run, and the flatness of the pass's peak rise."""
    ns = [r["negatives"] for r in rows]
    out = {
        "initial_pass_rise_bytes_per_negative": _slope(ns, [r["initial_pass_peak_rise_mib"] * 2**20 for r in rows]),
        "run_rise_bytes_per_negative": _slope(ns, [r["run_peak_rise_mib"] * 2**20 for r in rows]),
        "initial_pass_ms_per_negative": 1000 * _slope(ns, [r["initial_pass_s"] for r in rows]),
        "dataset_bytes_per_negative": _slope(ns, [r["dataset_bytes"] for r in rows]),
        "trace_bytes_per_negative": _slope(ns, [r["trace_bytes"] for r in rows]),
    }
    if len(rows) > 1:
        first = next((r for r in rows if r["negatives"] >= 5000), rows[0])
        last = rows[-1]
        flat = last["initial_pass_peak_rise_mib"] / max(first["initial_pass_peak_rise_mib"], 1e-9)
        out["flatness"] = {"from": first["negatives"], "to": last["negatives"], "ratio": flat}
        out["flatness"]["within_target"] = flat <= FLATNESS_TARGET
    return out


def print_report(result: dict) -> None:
    print(
        f"\n{'negatives':>9s} {'pass rise MiB':>13s} {'run rise MiB':>12s} {'pass s':>7s} {'run s':>7s} "
        f"{'dataset MiB':>11s} {'trace MiB':>9s} {'RSS built MiB':>13s}"
    )
    for r in result["rows"]:
        print(
            f"{r['negatives']:9d} {r['initial_pass_peak_rise_mib']:13.1f} {r['run_peak_rise_mib']:12.1f} "
            f"{r['initial_pass_s']:7.1f} {r['run_s']:7.1f} {r['dataset_bytes'] / 2**20:11.1f} "
            f"{r['trace_bytes'] / 2**20:9.1f} {r['rss_after_build_mib']:13.1f}"
        )
    s = result["summary"]
    print(
        f"\nper negative: initial pass {s['initial_pass_rise_bytes_per_negative']:.0f} B of peak rise and "
        f"{s['initial_pass_ms_per_negative']:.3f} ms; run {s['run_rise_bytes_per_negative']:.0f} B; tokenized data "
        f"{s['dataset_bytes_per_negative']:.0f} B; trace {s['trace_bytes_per_negative']:.0f} B"
    )
    if "flatness" in s:
        f = s["flatness"]
        print(
            f"initial pass peak rise {f['to']} / {f['from']} negatives: {f['ratio']:.2f}x "
            f"(target <= {FLATNESS_TARGET}x: {'met' if f['within_target'] else 'not met'})"
        )


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_scale_")
    os.makedirs(workdir, exist_ok=True)
    if args.worker is not None:
        with open(args.result, "w") as f:
            json.dump(measure(args.worker, args, workdir), f)
        return None
    rows = []
    for n in sorted(args.negatives):
        if args.inline:
            rows.append(measure(n, args, workdir))
            continue
        path = os.path.join(workdir, f"result_{n}.json")
        worker = [sys.executable, os.path.abspath(__file__), "--worker", str(n), "--result", path, "--workdir", workdir]
        for flag in ("seq_len", "batch_size", "pairs", "steps", "threads"):
            worker += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        subprocess.run(worker, check=True)
        with open(path) as f:
            rows.append(json.load(f))
        print(json.dumps(rows[-1]), flush=True)
    from trl_u2a.scripts.u2a import without_option

    # --workdir is scratch space, not a setting of the run, and often a private path
    result = {
        "command": "python benchmarks/bench_scale.py "
        + " ".join(without_option(sys.argv[1:] if argv is None else argv, "--workdir")),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "workdir", "worker", "result", "inline")},
        "machine": common.machine_info(),
        "rows": rows,
        "summary": summarise(rows),
    }
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
