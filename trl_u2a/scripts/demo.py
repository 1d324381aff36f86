"""`trl-u2a demo`: the offline benchmark, U2A against uniform unlearning, oracle, random subset and DPO.

```bash
trl-u2a demo                          # reduced: 1 seed, full fine-tuning and LoRA, every core method, a few minutes
trl-u2a demo --full                   # the comparison of docs/results.md (10 seeds, bootstrap intervals)
trl-u2a demo --quick --output_dir x   # a smoke test in about a minute (meaningless numbers)
trl-u2a demo --full --harmful_share 0.15  # the same comparison where 15 % of the negatives are harmful
trl-u2a demo --full --alignment_pairs 32  # U2A with 32 of the 80 alignment pairs
```

Needs the `[demo]` extra (matplotlib, alt-profanity-check): `pip install -e ".[demo]"`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys


def make_parser() -> argparse.ArgumentParser:
    try:
        from trl_u2a.demo.config import DemoConfig
    except ImportError:  # the package imports the [demo] extra; `cli` then names what is missing
        presets = {}
    else:
        presets = {"": DemoConfig.reduced(), "--full: ": DemoConfig.full(), "--quick: ": DemoConfig.quick()}

    def defaults(name: str) -> str:
        """The value of `name` in each preset: "(default: 0; --full: 0 1 ... 9; --quick: 0)"."""
        if not presets:
            return ""
        shown = []
        for label, config in presets.items():
            value = getattr(config, name)
            words = [str(v) for v in value] if isinstance(value, tuple) else [str(value)]
            shown.append(label + " ".join(words if len(words) <= 4 else [*words[:2], "...", words[-1]]))
        return f" (default: {'; '.join(shown)})"

    parser = argparse.ArgumentParser(
        prog="trl-u2a demo",
        description=(
            "Offline end-to-end benchmark on a built-in synthetic assistant task: train a tiny misaligned start "
            "model, unlearn its negatives with U2A and with the baselines (uniform, random subset, oracle, DPO), and "
            "report harmful rate (alt-profanity-check), alignment loss, preference accuracy, retain perplexity and "
            "selection precision. Without --full or --quick: one seed, every core method, a few minutes."
        ),
    )
    parser.add_argument(
        "--output_dir", default="u2a-demo", help="Where results.json, table.md and the plots go (default: %(default)s)."
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--full",
        action="store_true",
        help="The full comparison: 10 seeds, both settings, uniform/random/oracle/u2a (about 25-30 min).",
    )
    mode.add_argument("--quick", action="store_true", help="A smoke test in about a minute; the numbers mean nothing.")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"Seeds (data, start model, training){defaults('seeds')}.")
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=["full", "lora"],
        help=f"Full fine-tuning and/or a LoRA adapter{defaults('settings')}.",
    )
    parser.add_argument(
        "--learning_rates",
        type=float,
        nargs="+",
        help=f"Learning rates of full fine-tuning{defaults('learning_rates')}.",
    )
    parser.add_argument(
        "--lora_learning_rates",
        type=float,
        nargs="+",
        help=f"Learning rates of the LoRA setting{defaults('lora_learning_rates')}.",
    )
    parser.add_argument("--steps", type=int, help=f"Optimizer steps of every method{defaults('steps')}.")
    parser.add_argument(
        "--harmful_share",
        type=float,
        help="Share of the negatives that are harmful, in (0, 1), e.g. 0.15 for the low base rate (default: the "
        "task's 50 %%; the rest split 3:2 between low-quality answers and near-copies).",
    )
    parser.add_argument(
        "--alignment_pairs",
        type=int,
        help="How many of the task's 80 alignment pairs U2A gets, a random subset drawn with each seed, e.g. 32 "
        "(default: all 80).",
    )
    parser.add_argument(
        "--cache_dir", help="Cache of trained start models (default: $TRL_U2A_CACHE or ~/.cache/trl-u2a)."
    )
    parser.add_argument("--no_plots", action="store_true", help="Skip the PNG plots.")
    parser.add_argument("--no_progress", action="store_true", help="No progress bars.")
    return parser


# The `[demo]` extra: import name -> distribution name
DEMO_MODULES = {"matplotlib": "matplotlib", "profanity_check": "alt-profanity-check"}


def missing_demo_modules() -> list[str]:
    """Distributions of the `[demo]` extra that cannot be imported (looked up, not imported)."""
    missing = []
    for module, distribution in DEMO_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(distribution)
    return missing


def print_points(results: dict, config) -> None:
    """Too few seeds for an interval (the default: one seed): say so once, then point estimates in tables that fit a
    100-column terminal. table.md holds every column."""
    from trl_u2a.demo import format_frontier_points, format_points, one_seed_note

    seeds = sorted({run["seed"] for run in results["runs"] if "seed" in run}) or list(config.seeds)
    print("\n" + one_seed_note(seeds, config.min_seeds) + "\n")
    print(format_points(results["summary"]))
    print(
        "\nBest harmful rate within a retain-perplexity budget (× the start model's), over every lr and"
        "\nevaluated step; (Δ vs uniform) in parentheses:\n"
    )
    print(format_frontier_points(results["frontier"], config.ppl_budgets))


def print_evidence(results: dict, config) -> None:
    """Enough seeds for paired intervals: every table with its intervals, and the verdicts."""
    from trl_u2a.demo import format_evidence, format_frontier, format_table

    print("\nResults (mean ± std over seeds; Δ = paired difference vs uniform, same seed, setting, lr and loss):\n")
    print(format_table(results["summary"]))
    print("\nBest harmful rate within a retain-perplexity budget (× the start model's), over every lr and step:\n")
    print(format_frontier(results["frontier"], config.ppl_budgets))
    print("\nU2A against uniform (paired bootstrap intervals over seeds):\n")
    print(format_evidence(results["claim"]))
    print()
    for line in results.get("verdicts", []):
        print(line)


def cli(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    missing = missing_demo_modules()
    if missing:
        print(
            f"trl-u2a demo needs the [demo] extra ({', '.join(missing)} missing): "
            'pip install -e ".[demo]" in a checkout, or pip install "trl-u2a[demo]".',
            file=sys.stderr,
        )
        return 1
    from trl_u2a.demo import DemoConfig, run_demo

    overrides = {"output_dir": args.output_dir, "plots": not args.no_plots, "progress": not args.no_progress}
    names = ("seeds", "settings", "learning_rates", "lora_learning_rates", "steps", "cache_dir", "harmful_share")
    for name in (*names, "alignment_pairs"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = tuple(value) if isinstance(value, list) else value
    if args.full:
        config = DemoConfig.full(**overrides)
    elif args.quick:
        config = DemoConfig.quick(**overrides)
    else:
        config = DemoConfig.reduced(**overrides)
    results = run_demo(config)
    seeds = max((row["n"] for row in results["summary"]), default=0)
    if seeds < config.min_seeds:
        print_points(results, config)
    else:
        print_evidence(results, config)
    for run in results["runs"]:
        if "error" in run:
            print(f"{run['name']} failed: {run['error']}")
    timing = results["timing"]
    out = config.output_dir
    print(
        f"\nTotal {timing['total']:.0f} s (start models {timing['start_models']:.0f} s, training "
        f"{timing['training']:.0f} s, evaluation {timing['evaluation']:.0f} s)."
    )
    print(f"Results: {os.path.join(out, 'results.json')} and {os.path.join(out, 'table.md')}")
    for plot in results.get("plots", []):
        print(f"Plot: {os.path.join(out, plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
