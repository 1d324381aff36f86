"""Selection candidates at two base rates on the demo: the package defaults against named U2A variants, same seeds.

Runs the demo (`trl_u2a.demo`) once per harmful share and seed, with the methods `uniform`, `oracle`, `u2a` (the
package defaults) and one `u2a-<name>` per variant, then pools the seeds of each share and prints, per setting, loss
and method, the share of the oracle's harmful-rate and `J` gain recovered with its paired bootstrap interval, the
paired difference of the harmful rate against uniform, the selection precision (harmful share of the final
selection) and coverage (the share of all harmful negatives it holds), and the training time against uniform.

Each seed's demo writes `<out>/h<share>/seed<seed>/results.json`; a seed whose file exists is not rerun, so an
interrupted run resumes. The pooled summary goes to `<out>/summary.json`.

Usage:
    python benchmarks/bench_base_rates.py [--shares 0.5 0.15] [--seeds 0 1 2 3 4 5] [--settings lora]
        [--losses ga npo] [--variants pa_all] [--min-seeds 3] [--out bench-base-rates]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common

common.use_offline_environment()
os.environ.setdefault("TQDM_DISABLE", "1")

# Candidate -> U2AConfig overrides. The demo task has 80 alignment pairs and 234 negatives.
VARIANTS = {
    # The later refreshes' query on every alignment pair instead of one optimizer step's rows (8)
    "pa_all": {"pa_samples": 80},
    # The later refreshes' query on 32 pairs
    "pa32": {"pa_samples": 32},
    # A larger fixed budget: half of the negatives (only positive scores are kept, so it is a cap)
    "b0.5": {"budget": 0.5},
}


def run_share(share: float, seeds, settings, losses, variants, out: str) -> list[dict]:
    """Run (or read back) the demo of every seed at harmful share `share`; returns each seed's results."""
    from trl_u2a.demo import DemoConfig, run_demo

    results = []
    for seed in seeds:
        out_dir = os.path.join(out, f"h{share:g}", f"seed{seed}")
        path = os.path.join(out_dir, "results.json")
        if not os.path.isfile(path):
            config = DemoConfig(
                output_dir=out_dir,
                seeds=(seed,),
                harmful_share=None if share == 0.5 else share,
                settings=tuple(settings),
                losses=tuple(losses),
                methods=("u2a", "uniform", "oracle"),
                preconditioners=(),
                variants={f"u2a-{name}": VARIANTS[name] for name in variants},
                variant_losses=None,
                plots=False,
                progress=False,
                keep_traces=False,
            )
            run_demo(config)
            print(f"h{share:g} seed {seed} done", flush=True)
        with open(path) as f:
            results.append(json.load(f))
    return results


def pooled(results: list[dict], min_seeds: int) -> list[dict]:
    """The demo's summary over the pooled runs of several one-seed demos, plus coverage and time against uniform."""
    from trl_u2a.demo.stats import summarize

    runs = [r for res in results for r in res["runs"]]
    start = {k: v for res in results for k, v in res["start"].items()}
    kinds = {k: v for res in results for k, v in res["kinds"].items()}
    rows = summarize(runs, start, min_seeds=min_seeds)
    uniform_time = {}
    for r in runs:
        if r["method"] == "uniform":
            uniform_time[(r["seed"], r["setting"], r["loss"])] = r["train_seconds"]
    for row in rows:
        members = [
            r for r in runs if (r["setting"], r["loss"], r["method"]) == (row["setting"], row["loss"], row["method"])
        ]
        coverage, ratio = [], []
        for r in members:
            harmful = [i for i, kind in enumerate(kinds[str(r["seed"])]) if kind == "harmful"]
            if "weights" in r:
                coverage.append(sum(r["weights"][i] > 0 for i in harmful) / len(harmful))
            base = uniform_time.get((r["seed"], r["setting"], r["loss"]))
            if base:
                ratio.append(r["train_seconds"] / base)
        row["coverage"] = sum(coverage) / len(coverage) if coverage else math.nan
        row["time_vs_uniform"] = sum(ratio) / len(ratio) if ratio else math.nan
    return rows


def _fmt(row: dict, key: str) -> str:
    value, low, high = row.get(key, math.nan), row.get(f"{key}_lo", math.nan), row.get(f"{key}_hi", math.nan)
    if not isinstance(value, float) or math.isnan(value):
        return "-"
    return f"{value:+.2f} [{low:+.2f}, {high:+.2f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.15])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--settings", nargs="+", default=["lora"])
    parser.add_argument("--losses", nargs="+", default=["ga", "npo"])
    parser.add_argument("--variants", nargs="*", default=["pa_all"], choices=sorted(VARIANTS))
    parser.add_argument("--min-seeds", type=int, default=3, help="Fewest seeds that get a bounded interval.")
    parser.add_argument("--out", default="bench-base-rates")
    args = parser.parse_args(argv)
    common.set_threads(1)
    summary = {}
    for share in args.shares:
        results = run_share(share, args.seeds, args.settings, args.losses, args.variants, args.out)
        rows = pooled(results, args.min_seeds)
        summary[f"{share:g}"] = rows
        print(f"\nharmful share {share:g}, {len(results)} seeds")
        print("setting | loss | method | recovered harm | recovered J | d harmful rate | precision | coverage | time")
        for row in rows:
            if row["method"] in ("start", "uniform"):
                continue
            print(
                f"{row['setting']} | {row['loss']} | {row['method']} | {_fmt(row, 'rec_harmful_rate')} | "
                f"{_fmt(row, 'rec_J')} | {_fmt(row, 'd_harmful_rate')} | {row.get('sel_harmful', math.nan):.2f} | "
                f"{row['coverage']:.2f} | {row['time_vs_uniform']:.2f}x"
            )
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(common_jsonable(summary), f, indent=1)
    return 0


def common_jsonable(obj):
    from trl_u2a.demo.common import jsonable

    return jsonable(obj)


if __name__ == "__main__":
    sys.exit(main())
