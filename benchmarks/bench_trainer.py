"""Benchmark of `U2ATrainer` against TRL's trainers and of the cost of U2A's reweighting, with LoRA (r 16,
all-linear).

Two parts, each measured side by side in ONE process:

- `step`: step time of `U2ATrainer` with reweighting off (no `alignment_dataset`, loss `npo` with cached reference
  log-probs) vs `trl.KTOTrainer` (`loss_type="apo_zero_unpaired"`, `precompute_ref_log_probs=True`: the same one
  forward+backward per step) and `trl.SFTTrainer` (completion-only NLL), on the same rows and model. Target: U2A
  ≤ 1.05× each. `--all-baselines` adds KTO with TRL's defaults (reference forward every step) and the `kto` loss.
- `overhead`: the total time of a U2A run at the package defaults (`alignment_dataset` given, the overhead-bounded
  cadence after a warm-up, `in_training_scores=True`, ...) vs the same run with reweighting off, and vs
  `in_training_scores=False`. Reported apart: the initial pass (as a multiple of one training pass over the
  negatives) and the later refreshes (their share of the training time, against `reweight_overhead`; target: within
  it, and ≥ 3 re-selections in a 60-step run at batch 8).

How runs are interleaved: each trainer's `train()` runs in its own thread, and a round-robin baton lets exactly one
thread run at a time, handing over after every optimizer step (`on_step_end`, after U2A's refresh). So every run
advances one step per round and load from other processes hits all runs alike; round `r` visits the runs in an order
rotated by `r` (with a fixed order, the run that always followed another one inherited its caches: 8-12 % slower
steps on the tiny model). A step's time is the wall and CPU
time (`time.process_time`, the whole process, in which only the baton holder runs) from the moment its thread gets
the baton until its `on_step_end`: data loading, forward, backward, optimizer, callbacks and logging included. Every
row of every trainer has exactly `--seq-len` tokens (synthetic text, truncated at `max_length`), so shapes match.
Torch runs with `--threads` threads (OMP_NUM_THREADS is set before torch is imported). `--grad-accum` sets the
gradient accumulation of every trainer (`reweight_steps` counts optimizer steps, so it sets how many examples a
reweighting window trains).

Usage:
    python benchmarks/bench_trainer.py [--models tiny,bench20m] [--seq-lens 128,512] [--parts step,overhead]
        [--quick] [--json PATH]
    GPU: --device cuda --bf16 [--qlora] --models qwen0.5b (see benchmarks/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

STEP_TRAINERS = ("u2a_off", "kto_apo_zero_unpaired", "sft")
EXTRA_STEP_TRAINERS = ("kto_apo_zero_unpaired_ref_forward", "kto_kto")
OVERHEAD_TRAINERS = ("u2a_default", "u2a_no_in_training_scores", "u2a_off")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,bench20m", help=f"comma-separated presets: {sorted(common.PRESETS)}")
    parser.add_argument("--seq-lens", default="128,512", help="comma-separated sequence lengths")
    parser.add_argument("--parts", default="step,overhead", help="comma-separated: step, overhead")
    parser.add_argument("--batch-size", type=int, default=8, help="per-device batch size of every trainer")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps of every trainer")
    parser.add_argument("--steps", type=int, default=12, help="step part: timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=3, help="step part: untimed first steps per trainer")
    parser.add_argument("--run-steps", type=int, default=60, help="overhead part: optimizer steps of each run")
    parser.add_argument(
        "--reweight-steps", type=int, default=None, help="overhead part: a fixed U2A reweight_steps (default: None)"
    )
    parser.add_argument("--negatives", type=int, default=512, help="negatives in the training set")
    parser.add_argument("--retain", type=int, default=512, help="retain rows (label=True) in the training set")
    parser.add_argument("--pairs", type=int, default=64, help="alignment pairs (overhead part)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (all linear layers, alpha = 2 rank)")
    parser.add_argument("--all-baselines", action="store_true", help="step part: add KTO with TRL's defaults")
    parser.add_argument("--quick", action="store_true", help="fewer rows and steps (same shapes)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bf16 weights and autocast (GPU)")
    parser.add_argument("--qlora", action="store_true", help="4-bit nf4 base weights (bitsandbytes) under the LoRA")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--workdir", default=None, help="where models and run outputs go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = min(args.steps, 6), min(args.warmup, 2)
        args.negatives, args.retain, args.pairs = min(args.negatives, 128), min(args.retain, 64), min(args.pairs, 32)
        args.run_steps = min(args.run_steps, 30)
    args.models = [m for m in args.models.split(",") if m]
    args.seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    args.parts = [p for p in args.parts.split(",") if p]
    for m in args.models:
        if m not in common.PRESETS:
            parser.error(f"unknown model preset {m!r}; expected one of {sorted(common.PRESETS)}")
    return args


# -------------------------------------------------------------------------------------------------------------------
# trainers
# -------------------------------------------------------------------------------------------------------------------


def _common_kwargs(args, output_dir, max_steps, seq_len):
    kwargs = common.training_kwargs(
        output_dir,
        args.batch_size,
        seq_len,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=max_steps,
        learning_rate=1e-5,
        logging_steps=10,
        dataloader_num_workers=0,
    )
    if args.bf16:
        kwargs["model_init_kwargs"] = {"dtype": "bfloat16"}
    return kwargs


def _quantization(args):
    if not args.qlora:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16 if args.bf16 else torch.float32,
    )


def build_trainer(kind, args, model_path, data, seq_len, max_steps, output_dir, callbacks=None):
    """One trainer of `kind` on the same model, rows, LoRA and batch shapes."""
    peft_config = common.lora_config(args.rank)
    kwargs = _common_kwargs(args, output_dir, max_steps, seq_len)
    extra = dict(peft_config=peft_config, quantization_config=_quantization(args), callbacks=callbacks)
    if kind.startswith("u2a"):
        from trl_u2a import U2AConfig, U2ATrainer

        config = U2AConfig(
            **kwargs,
            reweight_steps=args.reweight_steps,
            in_training_scores=kind != "u2a_no_in_training_scores",
        )
        alignment = data["pairs"] if kind != "u2a_off" else None
        return U2ATrainer(
            model=model_path, args=config, train_dataset=data["unpaired"], alignment_dataset=alignment, **extra
        )
    if kind.startswith("kto"):
        from trl import KTOConfig, KTOTrainer

        loss_type = "kto" if kind == "kto_kto" else "apo_zero_unpaired"
        config = KTOConfig(
            **kwargs,
            loss_type=loss_type,
            precompute_ref_log_probs=kind != "kto_apo_zero_unpaired_ref_forward",
            train_sampling_strategy="sequential" if loss_type == "kto" else "random",
        )
        return KTOTrainer(model=model_path, args=config, train_dataset=data["unpaired"], **extra)
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(**kwargs, completion_only_loss=True)
        return SFTTrainer(model=model_path, args=config, train_dataset=data["sft"], **extra)
    raise ValueError(kind)


# -------------------------------------------------------------------------------------------------------------------
# interleaved runs
# -------------------------------------------------------------------------------------------------------------------


def _sync(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def run_interleaved(trainers: dict, args) -> dict:
    """Train every trainer to its `max_steps`, one optimizer step per turn (see the module docstring).

    Returns per trainer: `steps` (wall, cpu of each step's turn; the first turn also holds `train()`'s set-up and
    `on_train_begin`), `tail` (after the last step: `on_train_end`), `refreshes` (each refresh's step, wall, cpu),
    `final_objective` (the J evaluation at the end, if any).
    """
    import torch
    from transformers import TrainerCallback

    names = list(trainers)
    baton = common.RoundRobin(names)
    records = {n: {"steps": [], "refreshes": [], "final_objective": None, "error": None} for n in names}
    clocks = {n: common.Clock() for n in names}

    class Handover(TrainerCallback):
        """Added after U2A's refresh callback, so a refresh falls inside the turn of the step that triggers it."""

        def __init__(self, name):
            self.name = name

        def on_step_end(self, a, state, control, **kw):
            _sync(args.device)
            wall, cpu = clocks[self.name].read()
            records[self.name]["steps"].append({"step": state.global_step, "wall": wall, "cpu": cpu})
            baton.release(self.name)
            baton.acquire(self.name)
            clocks[self.name].start()

    for name, trainer in trainers.items():
        trainer.add_callback(Handover(name))
        callback = getattr(trainer, "refresh_callback", None)
        if callback is not None:
            controller = callback.controller
            controller.refresh = _timed(controller.refresh, records[name]["refreshes"], args.device, with_step=True)
            final = []
            controller._final_objective = _timed(controller._final_objective, final, args.device)
            records[name]["_final"] = final

    def work(name):
        torch.set_num_threads(args.threads)
        baton.acquire(name)
        clocks[name].start()
        try:
            trainers[name].train()
            _sync(args.device)
            wall, cpu = clocks[name].read()
            records[name]["tail"] = {"wall": wall, "cpu": cpu}
        except BaseException as exc:  # reported after the join; the baton must move on
            records[name]["error"] = repr(exc)
            raise
        finally:
            baton.finish(name)

    threads = [threading.Thread(target=work, args=(n,), name=n) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in names:
        if records[name]["error"]:
            raise RuntimeError(f"{name} failed: {records[name]['error']}")
        final = records[name].pop("_final", [])
        records[name]["final_objective"] = final[0] if final else None
    return records


def _timed(fn, sink, device, with_step=False):
    def wrapper(*a, **kw):
        _sync(device)
        clock = common.Clock()
        out = fn(*a, **kw)
        _sync(device)
        wall, cpu = clock.read()
        entry = {"wall": wall, "cpu": cpu}
        if with_step:
            entry["step"] = a[0]
        sink.append(entry)
        return out

    return wrapper


def _peak_memory(device):
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return None


# -------------------------------------------------------------------------------------------------------------------
# parts
# -------------------------------------------------------------------------------------------------------------------


def part_step(args, model_path, data, seq_len, workdir):
    kinds = list(STEP_TRAINERS) + (list(EXTRA_STEP_TRAINERS) if args.all_baselines else [])
    max_steps = args.warmup + args.steps
    trainers, construction = {}, {}
    for kind in kinds:
        clock = common.Clock()
        trainers[kind] = build_trainer(kind, args, model_path, data, seq_len, max_steps, os.path.join(workdir, kind))
        wall, cpu = clock.read()
        construction[kind] = {"wall": wall, "cpu": cpu}
    records = run_interleaved(trainers, args)
    results = {}
    for kind in kinds:
        timed = records[kind]["steps"][args.warmup :]
        results[kind] = {
            "construction": construction[kind],
            "step_wall_median": common.median([s["wall"] for s in timed]),
            "step_cpu_median": common.median([s["cpu"] for s in timed]),
            "step_wall_mean": sum(s["wall"] for s in timed) / len(timed),
            "step_cpu_mean": sum(s["cpu"] for s in timed) / len(timed),
            "steps": records[kind]["steps"],
        }
    base = results["u2a_off"]
    ratios = {}
    for kind in kinds:
        if kind == "u2a_off":
            continue
        r = results[kind]
        ratios[f"u2a_off/{kind}"] = {
            "wall_median": base["step_wall_median"] / r["step_wall_median"],
            "cpu_median": base["step_cpu_median"] / r["step_cpu_median"],
            "cpu_mean": base["step_cpu_mean"] / r["step_cpu_mean"],
        }
    for t in trainers.values():
        del t
    return {"trainers": results, "ratios": ratios}


def part_overhead(args, model_path, data, seq_len, workdir):
    trainers, construction = {}, {}
    for kind in OVERHEAD_TRAINERS:
        clock = common.Clock()
        trainers[kind] = build_trainer(
            kind, args, model_path, data, seq_len, args.run_steps, os.path.join(workdir, kind)
        )
        wall, cpu = clock.read()
        construction[kind] = {"wall": wall, "cpu": cpu}
    records = run_interleaved(trainers, args)
    results = {}
    for kind in OVERHEAD_TRAINERS:
        rec = records[kind]
        steps = rec["steps"]
        refresh_steps = {r["step"] for r in rec["refreshes"]}
        refresh = {
            "count": len(rec["refreshes"]),
            "wall": sum(r["wall"] for r in rec["refreshes"]),
            "cpu": sum(r["cpu"] for r in rec["refreshes"]),
            "each": rec["refreshes"],
        }
        # Steps without a refresh, after the first turn (which holds the set-up and the first refresh)
        plain = [s for s in steps[1:] if s["step"] not in refresh_steps]
        total_wall = sum(s["wall"] for s in steps) + rec["tail"]["wall"]
        total_cpu = sum(s["cpu"] for s in steps) + rec["tail"]["cpu"]
        results[kind] = {
            "construction": construction[kind],
            "train_wall": total_wall,
            "train_cpu": total_cpu,
            "refresh": refresh,
            "final_objective": rec["final_objective"],
            "plain_step_wall_median": common.median([s["wall"] for s in plain]),
            "plain_step_cpu_median": common.median([s["cpu"] for s in plain]),
            "plain_step_cpu_sum": sum(s["cpu"] for s in plain),
            "plain_steps": len(plain),
            "tail": rec["tail"],
            "num_scored": None,
        }
        callback = getattr(trainers[kind], "refresh_callback", None)
        if callback is not None:
            results[kind]["num_scored"] = [
                (h.get("num_scored"), h.get("num_scored_in_training")) for h in callback.history if "refresh" in h
            ]
    off = results["u2a_off"]
    overhead = {}
    for kind in ("u2a_default", "u2a_no_in_training_scores"):
        r = results[kind]
        overhead[kind] = {
            "train_wall": r["train_wall"] / off["train_wall"] - 1,
            "train_cpu": r["train_cpu"] / off["train_cpu"] - 1,
            "with_construction_cpu": (r["train_cpu"] + r["construction"]["cpu"])
            / (off["train_cpu"] + off["construction"]["cpu"])
            - 1,
            "refresh_share_cpu": r["refresh"]["cpu"] / off["train_cpu"],
            # The initial pass on its own, and what the re-selections after it cost (the bound reweight_overhead)
            "initial_pass_cpu": r["refresh"]["each"][0]["cpu"] if r["refresh"]["each"] else None,
            "initial_pass_multiple": (
                r["refresh"]["each"][0]["cpu"]
                / (off["plain_step_cpu_median"] * args.negatives / (args.batch_size * args.grad_accum))
                if r["refresh"]["each"]
                else None
            ),
            "reselections": max(0, r["refresh"]["count"] - 1),
            "after_initial_share_cpu": sum(e["cpu"] for e in r["refresh"]["each"][1:]) / off["train_cpu"],
            "plain_step_cpu": r["plain_step_cpu_median"] / off["plain_step_cpu_median"] - 1,
        }
    return {"trainers": results, "overhead": overhead}


# -------------------------------------------------------------------------------------------------------------------
# main
# -------------------------------------------------------------------------------------------------------------------


def print_step(case, res):
    print(f"\n[step] {case}: median over timed steps (per step, seconds)")
    print(f"{'trainer':36s} {'wall':>8s} {'cpu':>8s} {'U2A/x wall':>11s} {'U2A/x cpu':>10s}")
    for kind, r in res["trainers"].items():
        ratio = res["ratios"].get(f"u2a_off/{kind}")
        rw = f"{ratio['wall_median']:11.3f} {ratio['cpu_median']:10.3f}" if ratio else f"{'':11s} {'':10s}"
        print(f"{kind:36s} {r['step_wall_median']:8.3f} {r['step_cpu_median']:8.3f} {rw}")


def print_overhead(case, res):
    print(f"\n[overhead] {case}: train() totals, seconds")
    print(
        f"{'run':28s} {'wall':>8s} {'cpu':>8s} {'refreshes':>9s} {'refr cpu':>9s} {'step cpu':>9s} "
        f"{'overhead cpu':>12s} {'overhead wall':>13s}"
    )
    for kind, r in res["trainers"].items():
        o = res["overhead"].get(kind)
        ov = (
            f"{100 * o['train_cpu']:11.1f}% {100 * o['train_wall']:12.1f}%  initial pass "
            f"{o['initial_pass_multiple']:.2f}x, {o['reselections']} re-selections "
            f"{100 * o['after_initial_share_cpu']:.1f}%"
            if o
            else ""
        )
        print(
            f"{kind:28s} {r['train_wall']:8.1f} {r['train_cpu']:8.1f} {r['refresh']['count']:9d} "
            f"{r['refresh']['cpu']:9.1f} {r['plain_step_cpu_median']:9.3f} {ov}"
        )


def main(argv=None):
    args = parse_args(argv)
    common.set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_trainer_")
    report = {
        "command": "python benchmarks/bench_trainer.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")},
        "machine_start": common.machine_info(),
        "cases": {},
    }
    start = time.perf_counter()
    for preset in args.models:
        model_path = common.save_model(preset, os.path.join(workdir, "models"), "bfloat16" if args.bf16 else "float32")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        n_params = common.model_params(model_path)
        for seq_len in args.seq_lens:
            case = f"{preset}/T{seq_len}" + ("/qlora" if args.qlora else "")
            if args.grad_accum > 1:
                case += f"/ga{args.grad_accum}"
            data = common.make_data(tokenizer, seq_len, args.negatives, args.retain, args.pairs)
            entry = {"model": preset, "model_params": n_params, "seq_len": seq_len, "loadavg_before": os.getloadavg()}
            run_dir = os.path.join(workdir, case.replace("/", "_"))
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if "step" in args.parts:
                entry["step"] = part_step(args, model_path, data, seq_len, os.path.join(run_dir, "step"))
                print_step(case, entry["step"])
            if "overhead" in args.parts:
                entry["overhead"] = part_overhead(args, model_path, data, seq_len, os.path.join(run_dir, "overhead"))
                print_overhead(case, entry["overhead"])
            entry["peak_memory_mib"] = _peak_memory(args.device)
            entry["loadavg_after"] = os.getloadavg()
            report["cases"][case] = entry
            if args.json:  # after each case: a long run that dies keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=2)
    report["elapsed_s"] = time.perf_counter() - start
    report["machine_end"] = {"loadavg": os.getloadavg()}
    summary(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def summary(report):
    print(
        "\nSummary (targets: U2A step ≤ 1.05× KTO and SFT; re-selections after the initial pass within "
        "reweight_overhead, ≥ 3 of them in 60 steps)"
    )
    for case, entry in report["cases"].items():
        if "step" in entry:
            for key, r in entry["step"]["ratios"].items():
                print(f"  {case:24s} {key:48s} cpu {r['cpu_median']:.3f}×  wall {r['wall_median']:.3f}×")
        if "overhead" in entry:
            for kind, o in entry["overhead"]["overhead"].items():
                print(
                    f"  {case:24s} overhead {kind:39s} cpu {100 * o['train_cpu']:+.1f} %  wall "
                    f"{100 * o['train_wall']:+.1f} %  (plain steps {100 * o['plain_step_cpu']:+.1f} %); initial pass "
                    f"{o['initial_pass_multiple']:.2f}x a training pass over the negatives; {o['reselections']} "
                    f"re-selections: {100 * o['after_initial_share_cpu']:.1f} % of training"
                )


if __name__ == "__main__":
    main()
