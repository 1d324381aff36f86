"""How well U2A selects at the package defaults, refresh by refresh, in the setting users run: LoRA on a start model.

The planted task is the demo's (`trl_u2a.synthetic`: 234 negatives, 46 % of them `harmful`, the others
`low_quality` or `near_copy`; 80 alignment pairs) with the demo's start model (an SFT model trained from scratch,
cached). Each run trains a LoRA adapter (r 8, alpha 16, all-linear) with `U2ATrainer` at the package defaults
(budget, cadence, pool, pair sample, preconditioner) unless a variant overrides a field, and reads its trace:

- `precision`: the harmful share of the selected negatives at each refresh (the base rate is the harmful share of
  all negatives);
- `mass`: the harmful share of the weight mass;
- `coverage`: the share of all harmful negatives that the selection holds.

Variants (`--variants`): `default`; `identity-first` (`preconditioner_batches=0`: identity before the optimizer
has state, the previous behaviour); `rescore` (`in_training_scores=False`: every selected negative rescored with
the new query); `fixed50` (`reweight_steps=50`, the previous cadence).

Usage:
    python benchmarks/bench_selection.py [--losses ga,npo,simnpo] [--seeds 0,1,2] [--steps 60] [--batch-size 8]
        [--learning-rate 1e-3] [--variants default,identity-first] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

common.use_offline_environment()
os.environ.setdefault("TQDM_DISABLE", "1")

VARIANTS = {
    "default": {},
    "identity-first": {"preconditioner_batches": 0},
    "rescore": {"in_training_scores": False},
    "fixed50": {"reweight_steps": 50},
    "identity": {"preconditioner": "identity"},
    "all-pairs": {"pa_samples": 80},
    "no-warmup": {"reweight_warmup_steps": 0},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--losses", default="ga,npo,simnpo")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--variants", default="default", help=f"comma-separated: {sorted(VARIANTS)}")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--lora-init", default="default", choices=["default", "gaussian"], help="LoRA B init")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def selection_by_refresh(trace_path: str, kinds: list[str]) -> list[dict]:
    """Per refresh of a `u2a_trace.jsonl`: step, precision, mass and coverage of the harmful negatives."""
    by_refresh: dict[int, dict] = {}
    with open(trace_path) as f:
        for line in f:
            row = json.loads(line)
            entry = by_refresh.setdefault(row["refresh"], {"step": row["step"], "weights": {}})
            entry["weights"][row["example_id"]] = row["weight"]
    harmful_total = sum(kind == "harmful" for kind in kinds)
    out = []
    for refresh in sorted(by_refresh):
        weights = {i: w for i, w in by_refresh[refresh]["weights"].items() if w > 0}
        harmful = [i for i in weights if kinds[i] == "harmful"]
        mass = sum(weights.values())
        out.append(
            {
                "refresh": refresh,
                "step": by_refresh[refresh]["step"],
                "selected": len(weights),
                "precision": len(harmful) / len(weights) if weights else 0.0,
                "mass": sum(weights[i] for i in harmful) / mass if mass else 0.0,
                "coverage": len(harmful) / harmful_total,
                "kinds": {k: sum(kinds[i] == k for i in weights) / max(1, len(weights)) for k in sorted(set(kinds))},
            }
        )
    return out


def run(model_path: str, splits, loss: str, seed: int, variant: str, args) -> dict:
    from peft import LoraConfig

    from trl_u2a import U2AConfig, U2ATrainer

    with tempfile.TemporaryDirectory() as out:
        kwargs = common.training_kwargs(
            out,
            args.batch_size,
            128,
            max_steps=args.steps,
            learning_rate=args.learning_rate,
            logging_steps=10,
            save_refresh_plots=False,
            loss_type=loss,
            **VARIANTS[variant],
        )
        config = U2AConfig(**{**kwargs, "seed": seed})
        trainer = U2ATrainer(
            model=model_path,
            args=config,
            train_dataset=splits["train"].select_columns(["prompt", "completion", "label"]),
            alignment_dataset=splits["alignment"].select_columns(["prompt", "chosen", "rejected"]),
            peft_config=None
            if args.full
            else LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
                init_lora_weights=True if args.lora_init == "default" else "gaussian",
            ),
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        kinds = list(splits["forget"]["kind"])
        refreshes = selection_by_refresh(os.path.join(out, "u2a_trace.jsonl"), kinds)
        records = [r for r in trainer.refresh_callback.history if r.get("refresh") is not None]
        for entry, record in zip(refreshes, records):
            entry["preconditioner"] = record.get("preconditioner")
            entry["objective"] = record["objective"]
        final = trainer.refresh_callback.history[-1]
    return {
        "loss": loss,
        "seed": seed,
        "variant": variant,
        "seconds": seconds,
        "base_rate": sum(k == "harmful" for k in kinds) / len(kinds),
        "refreshes": refreshes,
        "final_objective": final["objective"],
        "reweight_share": final.get("reweight_share"),
        "initial_pass_multiple": final.get("initial_pass_multiple"),
    }


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else float("nan")


def summarize(results: list[dict]) -> list[dict]:
    """One row per (loss, variant): first / second / last refresh precision and mass, last coverage, final J."""
    rows = []
    keys = sorted({(r["loss"], r["variant"]) for r in results})
    for loss, variant in keys:
        group = [r for r in results if r["loss"] == loss and r["variant"] == variant]

        def at(position, field, group=group):
            picked = [r["refreshes"][position][field] for r in group if len(r["refreshes"]) > abs(position)]
            return _mean(picked)

        rows.append(
            {
                "loss": loss,
                "variant": variant,
                "runs": len(group),
                "refreshes": _mean([len(r["refreshes"]) for r in group]),
                "base_rate": _mean([r["base_rate"] for r in group]),
                "precision_first": at(0, "precision"),
                "precision_second": at(1, "precision"),
                "precision_last": at(-1, "precision"),
                "mass_first": at(0, "mass"),
                "mass_last": at(-1, "mass"),
                "coverage_last": at(-1, "coverage"),
                "final_objective": _mean([r["final_objective"] for r in group]),
                "reweight_share": _mean([r["reweight_share"] for r in group]),
                "initial_pass_multiple": _mean([r["initial_pass_multiple"] for r in group]),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        "| loss | variant | runs | refreshes | base rate | precision first / second / last | mass first / last "
        "| coverage last | final J | reweight share | initial pass |"
    )
    lines = [header, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['loss']} | {r['variant']} | {r['runs']} | {r['refreshes']:.1f} | {r['base_rate']:.2f} | "
            f"{r['precision_first']:.2f} / {r['precision_second']:.2f} / {r['precision_last']:.2f} | "
            f"{r['mass_first']:.2f} / {r['mass_last']:.2f} | {r['coverage_last']:.2f} | {r['final_objective']:.4f} | "
            f"{r['reweight_share']:.1%} | {r['initial_pass_multiple']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from trl_u2a.demo import DemoConfig, load_task, start_model

    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants has unknown entries {unknown}; expected some of {sorted(VARIANTS)}.")
    demo = DemoConfig.reduced()
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        splits = load_task(seed, demo)
        model = start_model(seed, demo, splits)
        for loss in args.losses.split(","):
            for variant in args.variants.split(","):
                result = run(model.path, splits, loss, seed, variant, args)
                results.append(result)
                trajectory = " ".join(
                    f"{r['step']}:{r['precision']:.2f}/{r['kinds'].get('near_copy', 0):.2f}/{r['selected']}"
                    f"/J{r['objective']:.3f}"
                    for r in result["refreshes"]
                )
                print(
                    f"seed {seed} {loss:6s} {variant:14s} step:harmful/near-copy share/selected/J {trajectory} final J "
                    f"{result['final_objective']:.3f} ({result['seconds']:.0f} s)",
                    flush=True,
                )
    rows = summarize(results)
    print()
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": rows, "runs": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
