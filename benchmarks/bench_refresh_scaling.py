"""Two-process scaling of a U2A refresh on CPU: 2 processes (one torch thread each) vs 1 process (one thread), over the
same candidates. Target: the 2-process refresh takes ≤ 0.6× the 1-process time.

Each run builds a `U2ATrainer` (LoRA r 16 all-linear, an alignment set), calls `trainer.create_optimizer()` and then
`trainer.refresh_callback.controller.refresh(step)` directly, without training:

- `cold`: the first refresh (refresh 0: every negative is a candidate), which also computes the reference log-probs
  of the alignment pairs once;
- `warm`: refresh 0 again (`refresh_index` and the weights reset), with those log-probs cached: the steady cost of
  scoring every negative, `∇J` on the pairs and the retain NLL. Repeated `--repeats` times.

Ranks meet at a barrier before and after each refresh; a refresh's time is the slowest rank's. The components are
timed too (`_reference_pair_logps`, `compute_query`, `_candidates`, `_score`, `_retain_nll`, `_log`). The 2-process
runs are launched with `accelerate launch --multi_gpu --num_processes 2` and `ACCELERATE_USE_CPU=true` (real DDP over
gloo); each worker asserts `PartialState().num_processes` is what was launched. 1- and 2-process runs alternate
(rounds, order flipped every round) so that load from other processes hits both alike. CPU time is
`time.process_time` per rank: with one thread per process it is insensitive to other processes; two ranks on a
machine with fewer than two idle cores slow down in wall time, so say the load next to the figures.

Usage: python benchmarks/bench_refresh_scaling.py [--models tiny,bench20m] [--seq-lens 128] [--rounds 2] [--quick]
    [--json PATH]
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

COMPONENTS = ("_reference_pair_logps", "compute_query", "_candidates", "_score", "_retain_nll", "_log")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,bench20m")
    parser.add_argument("--seq-lens", default="128")
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--retain", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="per-device batch size (= scoring batch size)")
    parser.add_argument("--repeats", type=int, default=1, help="warm refreshes per run")
    parser.add_argument("--rounds", type=int, default=2, help="1-process/2-process run pairs per case")
    parser.add_argument("--quick", action="store_true", help="64 negatives, 16 pairs, 1 round")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    # worker
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.negatives, args.pairs, args.rounds = min(args.negatives, 64), min(args.pairs, 16), 1
    args.models = [m for m in args.models.split(",") if m]
    args.seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    return args


# -------------------------------------------------------------------------------------------------------------------
# worker (one rank)
# -------------------------------------------------------------------------------------------------------------------


def worker(args):
    common.set_threads(1)
    import torch
    from accelerate import PartialState
    from transformers import AutoTokenizer

    import trl_u2a.refresh.controller as callback_module
    from trl_u2a import U2AConfig, U2ATrainer

    torch.set_num_threads(1)
    # cpu=True, as `use_cpu=True` in the trainer's config: `accelerate launch` rewrites ACCELERATE_USE_CPU from its own
    # (absent) --cpu flag, and a launched rank that is not told to use the CPU runs as an independent process
    state = PartialState(cpu=True)
    assert state.num_processes == args.expect, (
        f"launched for {args.expect} process(es) but PartialState().num_processes == {state.num_processes} "
        f"({state.distributed_type})"
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    data = common.make_data(tokenizer, args.seq_len, args.negatives, args.retain, args.pairs)
    config = U2AConfig(**common.training_kwargs(os.path.join(args.out, "run"), args.batch_size, args.seq_len))
    lora = common.lora_config(16)
    clock = common.Clock()
    trainer = U2ATrainer(
        model=args.model_path,
        args=config,
        train_dataset=data["unpaired"],
        alignment_dataset=data["pairs"],
        peft_config=lora,
    )
    construction = dict(zip(("wall", "cpu"), clock.read()))
    trainer.create_optimizer()
    callback = trainer.refresh_callback.controller
    accelerator = trainer.accelerator
    initial = trainer.weight_state

    components = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            c = common.Clock()
            out = fn(*a, **kw)
            wall, cpu = c.read()
            components.setdefault(name, []).append((wall, cpu))
            return out

        return wrapper

    for name in COMPONENTS:
        if name == "compute_query":
            callback_module.compute_query = timed(name, callback_module.compute_query)
        else:
            setattr(callback, name, timed(name, getattr(callback, name)))

    refreshes = []
    for i in range(1 + args.repeats):
        if i:
            callback.refresh_index = 0
            callback.history = []
            trainer.set_weights(initial)
        components.clear()
        accelerator.wait_for_everyone()
        c = common.Clock()
        record = callback.refresh(trainer.state.global_step)
        wall_refresh, cpu_refresh = c.read()
        accelerator.wait_for_everyone()
        wall_barrier, _ = c.read()
        refreshes.append(
            {
                "kind": "cold" if i == 0 else "warm",
                "wall": wall_refresh,
                "wall_with_barrier": wall_barrier,
                "cpu": cpu_refresh,
                "num_scored": record["num_scored"],
                "components": {k: [sum(w for w, _ in v), sum(cpu for _, cpu in v)] for k, v in components.items()},
            }
        )
    out = {
        "rank": state.process_index,
        "num_processes": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "backend": state.backend,
        "torch_threads": torch.get_num_threads(),
        "construction": construction,
        "refreshes": refreshes,
        "num_negatives": trainer.num_negatives,
        "weights_selected": int((trainer.weight_state.weights > 0).sum()),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{state.process_index}.json"), "w") as f:
        json.dump(out, f)


# -------------------------------------------------------------------------------------------------------------------
# driver
# -------------------------------------------------------------------------------------------------------------------


def launch(args, model_path, seq_len, processes, out):
    script = os.path.abspath(__file__)
    worker_args = [
        "--worker",
        "--model-path",
        model_path,
        "--seq-len",
        str(seq_len),
        "--expect",
        str(processes),
        "--negatives",
        str(args.negatives),
        "--retain",
        str(args.retain),
        "--pairs",
        str(args.pairs),
        "--batch-size",
        str(args.batch_size),
        "--repeats",
        str(args.repeats),
        "--out",
        out,
    ]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    if processes == 1:
        cmd = [sys.executable, script, *worker_args]
    else:
        port = str(29500 + (os.getpid() + int(time.time())) % 1000)
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--main_process_port",
            port,
            script,
            *worker_args,
        ]
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    ranks = []
    for r in range(processes):
        with open(os.path.join(out, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    assert all(x["num_processes"] == processes for x in ranks)
    return {"launch_wall": time.perf_counter() - start, "ranks": ranks, "command": cmd}


def summarise(runs):
    """Per kind (cold/warm): slowest-rank wall and CPU, and the CPU summed over ranks, medians over runs."""
    out = {}
    for kind in ("cold", "warm"):
        walls, cpus, cpu_sums, comps = [], [], [], {}
        for run in runs:
            per_rank = [[r for r in rank["refreshes"] if r["kind"] == kind] for rank in run["ranks"]]
            for i in range(len(per_rank[0])):
                entries = [p[i] for p in per_rank]
                walls.append(max(e["wall"] for e in entries))
                cpus.append(max(e["cpu"] for e in entries))
                cpu_sums.append(sum(e["cpu"] for e in entries))
                for name in COMPONENTS:
                    values = [e["components"].get(name, [0.0, 0.0]) for e in entries]
                    comps.setdefault(name, []).append((max(v[0] for v in values), max(v[1] for v in values)))
        if walls:
            out[kind] = {
                "wall": common.median(walls),
                "cpu_max_rank": common.median(cpus),
                "cpu_all_ranks": common.median(cpu_sums),
                "samples": len(walls),
                "components_max_rank": {
                    k: {"wall": common.median([w for w, _ in v]), "cpu": common.median([c for _, c in v])}
                    for k, v in comps.items()
                },
            }
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return None
    common.set_threads(1)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_refresh_scaling_")
    report = {
        "command": "python benchmarks/bench_refresh_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {
            k: getattr(args, k)
            for k in ("models", "seq_lens", "negatives", "retain", "pairs", "batch_size", "repeats", "rounds")
        },
        "machine_start": common.machine_info(),
        "cases": {},
    }
    for preset in args.models:
        model_path = common.save_model(preset, os.path.join(workdir, "models"))
        for seq_len in args.seq_lens:
            case = f"{preset}/T{seq_len}"
            runs = {1: [], 2: []}
            loads = [os.getloadavg()[0]]
            for r in range(args.rounds):
                for processes in (1, 2) if r % 2 == 0 else (2, 1):
                    out = os.path.join(workdir, case.replace("/", "_"), f"round{r}_p{processes}")
                    runs[processes].append(launch(args, model_path, seq_len, processes, out))
                    loads.append(os.getloadavg()[0])
                    print(
                        f"{case} round {r} processes {processes}: {runs[processes][-1]['launch_wall']:.1f} s",
                        flush=True,
                    )
            one, two = summarise(runs[1]), summarise(runs[2])
            entry = {"one": one, "two": two, "loadavg_1min_samples": loads, "runs": runs}
            entry["ratio"] = {
                kind: {
                    "wall": two[kind]["wall"] / one[kind]["wall"],
                    "cpu_max_rank": two[kind]["cpu_max_rank"] / one[kind]["cpu_max_rank"],
                    "cpu_all_ranks": two[kind]["cpu_all_ranks"] / one[kind]["cpu_all_ranks"],
                }
                for kind in one
            }
            report["cases"][case] = entry
            print_case(case, entry)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=2)
    report["machine_end"] = {"loadavg": os.getloadavg()}
    print("\nSummary (target: 2 processes ≤ 0.6× the 1-process refresh time)")
    for case, entry in report["cases"].items():
        for kind, r in entry["ratio"].items():
            print(
                f"  {case:16s} {kind:5s} wall {r['wall']:.3f}×  cpu (slowest rank) {r['cpu_max_rank']:.3f}×  "
                f"cpu (all ranks) {r['cpu_all_ranks']:.3f}×"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def print_case(case, entry):
    print(f"\n{case}: refresh time (median over runs; wall and CPU of the slowest rank), seconds")
    print(f"{'refresh':8s} {'procs':>5s} {'wall':>8s} {'cpu':>8s} {'cpu all':>8s}  components (cpu, slowest rank)")
    for kind in ("cold", "warm"):
        for label, res in (("1", entry["one"]), ("2", entry["two"])):
            if kind not in res:
                continue
            r = res[kind]
            comps = "  ".join(f"{k.strip('_')} {v['cpu']:.2f}" for k, v in r["components_max_rank"].items())
            print(f"{kind:8s} {label:>5s} {r['wall']:8.2f} {r['cpu_max_rank']:8.2f} {r['cpu_all_ranks']:8.2f}  {comps}")
        if kind in entry["ratio"]:
            x = entry["ratio"][kind]
            print(f"{kind:8s} {'2/1':>5s} {x['wall']:8.3f} {x['cpu_max_rank']:8.3f} {x['cpu_all_ranks']:8.3f}")


if __name__ == "__main__":
    main()
