"""Profile U2A's hot paths: a training step (with reweighting and in-training scores on) and a refresh.

Three views, all on the same model, rows and LoRA as bench_trainer.py:

- `--profiler torch`: `torch.profiler` over `--steps` training steps after the first refresh (with `--what
  refresh`: over refresh 0, every negative scored, right after construction), printing the operators by self CPU
  time, and the counts that reveal waste per step: model forwards (a hook on the decoder),
  `aten::_local_scalar_dense` (each `.item()`, `float(t)`: a host-device sync on a GPU) and copies.
- `--profiler cprofile`: `cProfile` of the same, printing the Python functions by cumulative time (Python overhead:
  row-by-row dataset access, per-step metrics, per-row loops).
- `--profiler none`: just runs it, for `py-spy record -f raw -o out.txt -- python benchmarks/profile_u2a.py ...`;
  then `python benchmarks/profile_u2a.py --collapse out.txt` prints inclusive sample shares of the functions of
  interest.

`--trainer kto` profiles `trl.KTOTrainer` (apo_zero_unpaired with cached reference log-probs) for comparison.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

FUNCTIONS = (  # qualified names as py-spy prints them; a frame matches when its name ends with one
    "Trainer._run_epoch",
    "U2ATrainer.training_step",
    "KTOTrainer.training_step",
    "U2ATrainer.compute_loss",
    "KTOTrainer.compute_loss",
    "U2ATrainer._log_batch_metrics",
    "RefreshController.record_training_scores",
    "GhostDotProduct._linear_hook",
    "_linear_hook.<locals>.contribution",
    "Accelerator.backward",
    "AcceleratedOptimizer.step",
    "Trainer._clip_grad_norm",
    "RefreshController.step_end",
    "RefreshController.refresh",
    "compute_query",
    "alignment_gradient",
    "RefreshController._reference_pair_logps",
    "RefreshController._pair_batches",
    "RefreshController._candidates",
    "RefreshController._score",
    "RefreshController._retain_nll",
    "RefreshController._log",
    "score_dataset",
    "_ghost_scores",
    "scoring_mode",
    "GhostDotProduct.__init__",
    "Dataset.__getitem__",
    "UnpairedCollator.__call__",
    "sequence_logps",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bench20m", choices=sorted(common.PRESETS))
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="profiled training steps")
    parser.add_argument("--what", default="step", choices=["step", "refresh"])
    parser.add_argument("--trainer", default="u2a", choices=["u2a", "kto"])
    parser.add_argument("--profiler", default="torch", choices=["torch", "cprofile", "none"])
    parser.add_argument("--in-training-scores", type=int, default=1)
    parser.add_argument("--rows", type=int, default=30, help="rows of the printed tables")
    parser.add_argument("--collapse", default=None, help="summarise a py-spy raw (collapsed) file and exit")
    parser.add_argument("--workdir", default=None)
    return parser.parse_args(argv)


def collapse(path, rows):
    """Inclusive samples per function of interest in a py-spy `-f raw` file (`frame;frame;... count`, frames
    `Qualified.name (file:line)`), as a share of all samples and of the enclosing training step or refresh."""
    parents = ("U2ATrainer.training_step", "KTOTrainer.training_step", "RefreshController.refresh")
    total, inclusive = 0, collections.Counter()
    within = {p: collections.Counter() for p in parents}
    for line in open(path):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        count = int(count)
        total += count
        names = {frame.split(" (")[0].strip() for frame in stack.split(";")}
        hits = [key for key in FUNCTIONS if any(name == key or name.endswith("." + key) for name in names)]
        for key in hits:
            inclusive[key] += count
            for p in parents:
                if p in hits:
                    within[p][key] += count
    print(f"{total} samples; inclusive share of all samples, and inside {', '.join(parents)}")
    for key, count in inclusive.most_common(rows):
        shares = "  ".join(
            f"{100 * within[p][key] / inclusive[p]:5.1f} % of {p}" for p in parents if inclusive[p] and within[p][key]
        )
        print(f"{key:45s} {100 * count / total:5.1f} %   {shares}")


def build(args, workdir):

    model_path = common.save_model(args.model, os.path.join(workdir, "models"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = common.make_data(tokenizer, args.seq_len, args.negatives, args.negatives, args.pairs)
    lora = common.lora_config(16)
    kwargs = common.training_kwargs(
        os.path.join(workdir, "out"),
        args.batch_size,
        args.seq_len,
        max_steps=args.steps + 2,
        learning_rate=1e-5,
        logging_steps=10,
    )
    if args.trainer == "kto":
        from trl import KTOConfig, KTOTrainer

        config = KTOConfig(**kwargs, loss_type="apo_zero_unpaired", precompute_ref_log_probs=True)
        return KTOTrainer(model=model_path, args=config, train_dataset=data["unpaired"], peft_config=lora)
    from trl_u2a import U2AConfig, U2ATrainer

    # reweight_steps beyond the run: the profiled steps are plain steps (with in-training scoring after refresh 0)
    config = U2AConfig(**kwargs, reweight_steps=10_000, in_training_scores=bool(args.in_training_scores))
    return U2ATrainer(
        model=model_path,
        args=config,
        train_dataset=data["unpaired"],
        alignment_dataset=data["pairs"],
        peft_config=lora,
    )


class Counters:
    """Model forwards (a hook on the decoder module) between `mark()` calls."""

    def __init__(self, model):
        import torch

        base = model
        while hasattr(base, "base_model") and base.base_model is not base:
            base = base.base_model
        decoder = next(m for m in base.modules() if type(m).__name__.endswith("Model") and hasattr(m, "layers"))
        self.forwards = self.frozen = 0
        self.handle = decoder.register_forward_hook(self._hook)
        self.torch = torch

    def _hook(self, *a):
        self.forwards += 1


def torch_table(prof, rows, steps):
    events = prof.key_averages()
    counts = {e.key: e.count for e in events}
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    total_self = sum(e.self_cpu_time_total for e in events)
    print(f"total self CPU time {total_self / 1e6:.2f} s over {steps} step(s)")
    for key in (
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::copy_",
        "aten::to",
        "aten::linear",
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::matmul",
    ):
        if key in counts:
            print(f"{key:32s} {counts[key] / steps:10.1f} per step")


def main(argv=None):
    args = parse_args(argv)
    if args.collapse:
        collapse(args.collapse, args.rows)
        return
    common.set_threads(1)
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(1)
    workdir = args.workdir or tempfile.mkdtemp(prefix="profile_u2a_")
    trainer = build(args, workdir)
    counters = Counters(trainer.model)

    profiler = None
    if args.profiler == "torch":
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
    elif args.profiler == "cprofile":
        import cProfile

        profiler = cProfile.Profile()

    def start():
        counters.forwards = 0
        if profiler is None:
            return
        if args.profiler == "torch":
            profiler.__enter__()
        else:
            profiler.enable()

    def stop():
        counters.frozen = counters.forwards
        if profiler is None:
            return
        if args.profiler == "torch":
            profiler.__exit__(None, None, None)
        else:
            profiler.disable()

    def report(label, steps):
        forwards = counters.frozen
        print(f"\n=== {label}: model forwards {forwards} ({forwards / steps:.2f} per step) ===")
        if args.profiler == "torch":
            torch_table(profiler, args.rows, steps)
        elif args.profiler == "cprofile":
            import pstats

            pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.rows)

    if args.what == "step":

        class Window(TrainerCallback):
            """Profile steps 2..steps+1 (step 1 warms up; refresh 0 ran in on_train_begin)."""

            def on_step_begin(self, a, state, control, **kw):
                if state.global_step == 1:
                    start()

            def on_step_end(self, a, state, control, **kw):
                if state.global_step == args.steps + 1:
                    stop()

        trainer.add_callback(Window())
        trainer.train()
        report(f"{args.trainer} training steps", args.steps)
        return

    # refresh: refresh 0 (every negative scored) right after construction, then a refresh after training
    trainer.create_optimizer()
    callback = trainer.refresh_callback
    start()
    callback.refresh(trainer.state, trainer.control)
    stop()
    report("refresh 0 (all negatives)", 1)


if __name__ == "__main__":
    main()
