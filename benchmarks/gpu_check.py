"""Influence-scoring benchmark on an accelerator (or, for a dry run, the CPU): ghost scoring vs the per-example loop vs
a training pass, with LoRA and with QLoRA, on a 0.5B-1B model built from a config (no hub), in bf16.

The same three methods as bench_scoring.py, side by side on the same batches:

- `train`: one training forward+backward per batch (`loss.mean().backward()`, no optimizer step);
- `ghost`: `trl_u2a.influence.score_negatives_batch` per batch (one forward + one backward);
- `per_example`: the U2A reference code's loop: batch size 1, `torch.autograd.grad` over every trainable parameter,
  flatten, dot with the flattened query (fp32 dot).

Methods are interleaved batch by batch (rotating order), after one warm-up batch each; on CUDA every timing is
bracketed by `torch.cuda.synchronize()`. Peak memory: `torch.cuda.max_memory_allocated` over one batch of each method,
minus the memory allocated before it (model, optimizer-free). Targets: ghost throughput ≥ 0.9× training throughput;
ghost ≥ 10× the per-example loop.

bench_scoring.py stays the CPU reference (fp32, 19M model); this script adds the device, the dtype, QLoRA and
realistic vocabularies. It is driven by benchmarks/gpu_check.sh, which also runs bench_trainer.py.

Usage: python benchmarks/gpu_check.py [--device cuda] [--model qwen0.5b] [--seq-lens 128,512] [--quant none,4bit]
    [--n 64] [--batch-size 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

METHODS = ("train", "ghost", "per_example")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="qwen0.5b", choices=sorted(common.PRESETS))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--seq-lens", default="128,512")
    parser.add_argument("--quant", default="none,4bit", help="comma-separated: none (LoRA), 4bit (QLoRA nf4)")
    parser.add_argument("--n", type=int, default=64, help="negatives per method")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--per-example-n", type=int, default=None, help="negatives of the per-example loop (default n)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU dry runs)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    args.quant = [q for q in args.quant.split(",") if q]
    if args.n % args.batch_size:
        parser.error("--n must be a multiple of --batch-size")
    return args


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def build(args, model_path, quant, seq_len):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trl_u2a import influence as inf

    dtype = getattr(torch, args.dtype)
    kwargs = {"dtype": dtype}
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
        kwargs["device_map"] = {"": 0} if args.device == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if quant != "4bit":
        model = model.to(args.device)
    gen = torch.Generator().manual_seed(0)
    model, params, v = common.lora_scoring_setup(model, args.rank, gen)
    vocab = min(model.get_input_embeddings().weight.shape[0], 32000)
    batches = common.random_batches(args.n, args.batch_size, seq_len, vocab, gen, args.device)
    info = {
        "model_params": common.model_params(model_path),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    return model, params, v, batches, inf.make_unlearning_loss_fn("ga"), info


def run_method(method, model, params, v, batches, loss_fn, per_example_rows=None):
    """`method` over `batches`; returns the scores (None for `train`)."""
    import torch

    from trl_u2a import influence as inf
    from trl_u2a.core.modeling import eval_mode, slice_batch

    if method == "train":
        model.train()
        for batch in batches:
            loss_fn(model, batch).mean().backward()
            model.zero_grad(set_to_none=True)
        return None
    if method == "ghost":
        return torch.cat([inf.score_negatives_batch(model, batch, loss_fn, v).float() for batch in batches])
    # per_example: batch size 1, the full flattened gradient per example. eval_mode (not model.eval()) keeps
    # bitsandbytes 4-bit layers in training mode, as trl_u2a does (see modeling.eval_mode).
    flat_v = torch.cat([v[p].reshape(-1).float() for p in params])
    scores = []
    with eval_mode(model):
        for batch in batches:
            rows = batch["input_ids"].shape[0] if per_example_rows is None else per_example_rows
            for i in range(rows):
                loss = loss_fn(model, slice_batch(batch, i)).sum()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                flat = torch.cat(
                    [(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)]
                )
                scores.append(torch.dot(flat, flat_v))
    return torch.stack(scores)


def measure(args, model_path, quant, seq_len):
    import torch

    model, params, v, batches, loss_fn, info = build(args, model_path, quant, seq_len)
    per_rows = None
    if args.per_example_n is not None:
        per_rows = max(1, args.per_example_n // len(batches))
    for method in METHODS:
        run_method(method, model, params, v, batches[:1], loss_fn, per_rows)  # warm-up
    sync(args.device)
    memory = {}
    if args.device == "cuda":
        for method in METHODS:
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run_method(method, model, params, v, batches[:1], loss_fn, per_rows)
            sync(args.device)
            memory[method] = (torch.cuda.max_memory_allocated() - before) / 2**20
    wall = dict.fromkeys(METHODS, 0.0)
    cpu = dict.fromkeys(METHODS, 0.0)
    parts = {m: [] for m in METHODS}
    for k, batch in enumerate(batches):
        for j in range(len(METHODS)):
            method = METHODS[(k + j) % len(METHODS)]
            sync(args.device)
            start, start_cpu = time.perf_counter(), time.process_time()
            out = run_method(method, model, params, v, [batch], loss_fn, per_rows)
            sync(args.device)
            wall[method] += time.perf_counter() - start
            cpu[method] += time.process_time() - start_cpu
            parts[method].append(out)
    examples = {m: args.n for m in METHODS}
    if per_rows is not None:
        examples["per_example"] = per_rows * len(batches)
    results = {
        m: {
            "seconds": wall[m],
            "cpu_seconds": cpu[m],
            "examples": examples[m],
            "examples_per_s": examples[m] / wall[m],
            "peak_delta_mib": memory.get(m),
        }
        for m in METHODS
    }
    ghost = torch.cat(parts["ghost"])
    loop = torch.cat(parts["per_example"])
    if per_rows is not None:  # the loop scored the first `per_rows` rows of each batch
        ghost = ghost.view(len(batches), -1)[:, :per_rows].reshape(-1)
    rel_err = ((ghost - loop).abs().max() / loop.abs().max().clamp(min=1e-30)).item()
    train_rate = results["train"]["examples_per_s"]
    summary = {
        "ghost_throughput_vs_train": results["ghost"]["examples_per_s"] / train_rate,
        "ghost_vs_per_example_speedup": results["ghost"]["examples_per_s"] / results["per_example"]["examples_per_s"],
        "ghost_memory_vs_train": (memory["ghost"] / memory["train"]) if memory else None,
        "ghost_vs_per_example_max_rel_err": rel_err,
    }
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {**info, "results": results, **summary}


def main(argv=None):
    args = parse_args(argv)
    threads = args.threads or (1 if args.device == "cpu" else None)
    if threads:
        common.set_threads(threads)
    import torch

    if threads:
        torch.set_num_threads(threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False (a CPU build of torch?)")
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    model_path = common.save_model(args.model, os.path.join(workdir, "models"), args.dtype)
    report = {
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {
            k: getattr(args, k)
            for k in ("device", "model", "dtype", "seq_lens", "quant", "n", "batch_size", "rank", "per_example_n")
        },
        "machine": common.machine_info(),
        "cases": {},
    }
    header = (
        f"{'case':28s} {'train ex/s':>10s} {'ghost ex/s':>10s} {'loop ex/s':>10s} {'ghost/train':>11s} "
        f"{'ghost/loop':>10s} {'mem g/t':>8s} {'rel err':>8s}"
    )
    print(header, flush=True)
    for quant in args.quant:
        for seq_len in args.seq_lens:
            case = f"{args.model}/{'qlora' if quant == '4bit' else 'lora'}/T{seq_len}"
            r = measure(args, model_path, quant, seq_len)
            report["cases"][case] = r
            mem = f"{r['ghost_memory_vs_train']:8.2f}" if r["ghost_memory_vs_train"] is not None else f"{'-':>8s}"
            res = r["results"]
            print(
                f"{case:28s} {res['train']['examples_per_s']:10.1f} {res['ghost']['examples_per_s']:10.1f} "
                f"{res['per_example']['examples_per_s']:10.1f} {r['ghost_throughput_vs_train']:11.2f} "
                f"{r['ghost_vs_per_example_speedup']:10.1f} {mem} {r['ghost_vs_per_example_max_rel_err']:8.1e}",
                flush=True,
            )
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report, f, indent=2)
    print("targets: ghost/train ≥ 0.9 (throughput), ghost/loop ≥ 10 (on a GPU)")
    return report


if __name__ == "__main__":
    main()
