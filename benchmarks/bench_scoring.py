"""CPU benchmark of influence scoring: ghost dot products vs a per-example gradient loop vs a training pass.

Model: a randomly initialised ~20M-parameter Llama (hidden 512, 6 layers, intermediate 1536, tied embeddings,
the test tokenizer's small vocabulary) with LoRA r=16 on every linear layer. Data: `--n` negatives of `--seq-len`
tokens (random ids, a random-length prompt masked out), loss `ga`.

Measured side by side, over the same examples:

- `ghost`: `trl_u2a.influence.score_negatives_batch`, batches of `--batch-size` (one forward + one backward each,
  autograd asked for the module outputs only);
- `per_example`: how the U2A reference code scores: batch size 1, `torch.autograd.grad` over all trainable
  parameters, flatten, concatenate, dot with the flattened query;
- `train`: one training forward+backward per batch of `--batch-size` (`loss.mean().backward()`, no optimizer step).

Time: wall clock in this process after one warm-up batch per method, summed over the batches; the methods are
interleaved batch by batch (rotating order) so that load from other processes hits them alike; best of `--repeats`.
CPU time (`time.process_time`) is reported next to it: with one thread it is insensitive to other processes.
Memory: peak resident-set growth, measured in a fresh child process per method. The child builds the model,
runs the method once to warm up (oneDNN kernels, allocator), returns freed memory to the OS (`malloc_trim`),
resets the kernel's peak-RSS counter (`/proc/self/clear_refs` = 5), reads VmRSS, runs the method on ONE batch, and
reports `VmHWM − VmRSS_before`. glibc is told to serve every allocation ≥ 64 KiB with mmap
(`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave the resident set at once and the RSS follows live tensor memory.

Usage: python benchmarks/bench_scoring.py [--quick] [--n 256] [--seq-len 128] [--json PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

METHODS = ("train", "ghost", "per_example")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256, help="number of negatives")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of ghost scoring and training")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (all linear layers)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per method (best is reported)")
    parser.add_argument("--quick", action="store_true", help="n=64 (a quarter of the examples, same shapes)")
    parser.add_argument("--no-memory", action="store_true", help="skip the child-process memory measurements")
    parser.add_argument("--json", type=str, default=None, help="write the results as JSON to this path")
    parser.add_argument("--memory-child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n = min(args.n, 64)
    if args.n % args.batch_size:
        parser.error("--n must be a multiple of --batch-size")
    return args


# -------------------------------------------------------------------------------------------------------------------
# setup
# -------------------------------------------------------------------------------------------------------------------


def build(args):
    import torch

    from trl_u2a import influence as inf
    from trl_u2a.testing import build_tiny_model, build_tokenizer

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    model = build_tiny_model(
        tokenizer,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=8,
        intermediate_size=args.intermediate,
        max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=True,
    )
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    model, params, v = common.lora_scoring_setup(model, args.rank, gen)
    vocab = len(tokenizer)
    batches = common.random_batches(args.n, args.batch_size, args.seq_len, vocab, gen)
    info = {
        "model_params": n_params,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "vocab_size": vocab,
    }
    return model, params, v, batches, inf.make_unlearning_loss_fn("ga"), info


def run_method(method, model, params, v, batches, loss_fn):
    """Run `method` over `batches`; returns the scores (None for `train`)."""
    import torch

    from trl_u2a import influence as inf
    from trl_u2a.core.modeling import slice_batch

    if method == "train":
        model.train()
        for batch in batches:
            loss = loss_fn(model, batch).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        return None
    if method == "ghost":
        return torch.cat([inf.score_negatives_batch(model, batch, loss_fn, v) for batch in batches])
    # per_example: the reference implementation's loop (batch size 1, full flattened gradient per example)
    flat_v = torch.cat([v[p].reshape(-1) for p in params])
    scores = []
    model.eval()
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            loss = loss_fn(model, slice_batch(batch, i)).sum()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
            scores.append(torch.dot(flat, flat_v))
    model.train()
    return torch.stack(scores)


# -------------------------------------------------------------------------------------------------------------------
# memory (child process)
# -------------------------------------------------------------------------------------------------------------------


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(args):
    model, params, v, batches, loss_fn, _ = build(args)
    batch = batches[:1]
    run_method(args.memory_child, model, params, v, batch, loss_fn)  # warm-up
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _status_kib("VmRSS")
    run_method(args.memory_child, model, params, v, batch, loss_fn)
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {"method": args.memory_child, "rss_before_mib": before / 1024, "peak_delta_mib": (peak - before) / 1024}
        )
    )


def measure_memory(args, method):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", method]
    for key in ("n", "seq_len", "batch_size", "hidden", "layers", "intermediate", "rank", "threads"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TQDM_DISABLE="1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory child for {method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------------------------
# main
# -------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return None
    import torch

    model, params, v, batches, loss_fn, info = build(args)
    for method in METHODS:
        run_method(method, model, params, v, batches[:1], loss_fn)  # warm-up
    # Interleaved: every batch goes through all three methods (in a rotating order) before the next batch, so that
    # load from other processes on a shared machine hits the methods alike.
    best = {m: (float("inf"), float("inf")) for m in METHODS}  # (wall, cpu) seconds
    scores = {}
    for _ in range(args.repeats):
        wall = dict.fromkeys(METHODS, 0.0)
        cpu = dict.fromkeys(METHODS, 0.0)
        parts = {m: [] for m in METHODS}
        for k, batch in enumerate(batches):
            for j in range(len(METHODS)):
                method = METHODS[(k + j) % len(METHODS)]
                start, start_cpu = time.perf_counter(), time.process_time()
                out = run_method(method, model, params, v, [batch], loss_fn)
                wall[method] += time.perf_counter() - start
                cpu[method] += time.process_time() - start_cpu
                parts[method].append(out)
        for method in METHODS:
            best[method] = min(best[method], (wall[method], cpu[method]))
            print(f"{method:12s} wall {wall[method]:8.2f} s  cpu {cpu[method]:8.2f} s", flush=True)
        scores = {m: torch.cat(parts[m]) for m in ("ghost", "per_example")}
    results = {
        m: {"seconds": best[m][0], "cpu_seconds": best[m][1], "examples_per_s": args.n / best[m][0]} for m in METHODS
    }
    if not args.no_memory:
        for method in METHODS:
            results[method].update(measure_memory(args, method))
    train = results["train"]
    for method in METHODS:
        r = results[method]
        r["time_vs_train"] = r["seconds"] / train["seconds"]
        r["cpu_time_vs_train"] = r["cpu_seconds"] / train["cpu_seconds"]
        if "peak_delta_mib" in r:
            r["memory_vs_train"] = r["peak_delta_mib"] / train["peak_delta_mib"]
    rel_err = ((scores["ghost"] - scores["per_example"]).abs().max() / scores["per_example"].abs().max()).item()

    report = {
        "command": "python benchmarks/bench_scoring.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {
            k: getattr(args, k)
            for k in ("n", "seq_len", "batch_size", "hidden", "layers", "intermediate", "rank", "threads", "repeats")
        },
        **info,
        "results": results,
        "ghost_vs_per_example_max_rel_err": rel_err,
        "memory_method": "peak RSS growth over one batch in a fresh child process (VmHWM reset via clear_refs, "
        "malloc_trim, MALLOC_MMAP_THRESHOLD_=65536)",
        "platform": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
        },
    }
    print()
    print(
        f"model {info['model_params'] / 1e6:.1f}M params, LoRA r={args.rank} all-linear "
        f"({info['trainable_params'] / 1e6:.2f}M trainable), n={args.n}, T={args.seq_len}, B={args.batch_size}, "
        f"threads={args.threads}"
    )
    header = ("method", "wall (s)", "ex/s", "wall/train", "cpu (s)", "cpu/train", "peak MiB", "mem/train")
    print("{:12s} {:>9s} {:>8s} {:>11s} {:>9s} {:>10s} {:>9s} {:>10s}".format(*header))
    for method in METHODS:
        r = results[method]
        mem = f"{r['peak_delta_mib']:9.1f} {r['memory_vs_train']:10.2f}" if "peak_delta_mib" in r else ""
        print(
            f"{method:12s} {r['seconds']:9.2f} {r['examples_per_s']:8.1f} {r['time_vs_train']:11.2f} "
            f"{r['cpu_seconds']:9.2f} {r['cpu_time_vs_train']:10.2f} {mem}"
        )
    print(f"ghost vs per-example scores: max relative error {rel_err:.2e}")
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
