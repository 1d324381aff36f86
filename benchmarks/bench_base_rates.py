"""Selection candidates at two base rates on the demo: the package defaults against named U2A variants, same seeds.

Runs the demo (`trl_u2a.demo`) once per harmful share and seed, with the methods `uniform`, `oracle`, `u2a` (the
package defaults) and one `u2a-<name>` per variant (`VARIANTS`), then pools the seeds of each share and prints, per
setting, loss and method: the share of the oracle's gain recovered (harmful rate, harm probability, `J` on the
alignment pairs, DPO loss on the held-out test pairs) with paired bootstrap intervals, the paired difference of the
harmful rate against uniform, the selection's precision (harmful share) and coverage (share of all harmful negatives
it holds), the costs (initial pass, later refreshes, training time against uniform), and each variant against the
defaults paired by seed.

A seed's baselines and `u2a` run once in `<out>/h<share>/seed<seed>/base`; variants missing from that seed run
later in a folder of their own, so that an interrupted run resumes and a later call adds variants to the same seeds.
`--report-only` pools what is there. The pooled summary goes to `<out>/summary.json` (`summary-p<pairs>.json` with
`--alignment-pairs`, whose runs go to `<out>/h<share>-p<pairs>`).

Usage:
    python benchmarks/bench_base_rates.py [--shares 0.5 0.15] [--seeds 0 1 2 3 4 5] [--settings lora]
        [--losses ga npo] [--variants pa_all b0.5 auto] [--min-seeds 3] [--out bench-base-rates] [--report-only]
        [--alignment-pairs 32] [--dpo-pairs]
"""

from __future__ import annotations

import argparse
import glob
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
    # Every negative with a positive score (a budget that follows the data, no cap)
    "b1": {"budget": 1.0},
    # The later refreshes' query on every pair, with the overhead raised so that the same re-selection still runs
    # (at 30 steps, 80 pairs do not fit the default 15 % and "pa_all" has no later refresh at all)
    "pa_all_paid": {"pa_samples": 80, "reweight_overhead": 0.75},
    # The budget the initial pass finds (Otsu's threshold of its scores), uncapped
    "auto": {"auto_budget": True, "budget": 1.0},
    # The same, capped by the default budget (25 %) and floored at 5 % of the negatives
    "auto_capped": {"auto_budget": True, "budget": 0.25},
    # The same, capped at half of the negatives
    "auto_cap50": {"auto_budget": True, "budget": 0.5},
}


def _seed_results(seed_dir: str) -> list[dict]:
    """Every demo result under `seed_dir` (one per method set run for that seed)."""
    results = []
    for path in sorted(glob.glob(os.path.join(seed_dir, "**", "results.json"), recursive=True)):
        with open(path) as f:
            results.append(json.load(f))
    return results


def share_dir(out: str, share: float, alignment_pairs: int | None = None) -> str:
    """`<out>/h<share>`, or `<out>/h<share>-p<pairs>` when U2A gets `alignment_pairs` of the 80 pairs."""
    return os.path.join(out, f"h{share:g}" + (f"-p{alignment_pairs}" if alignment_pairs else ""))


def run_share(
    share: float,
    seeds,
    settings,
    losses,
    variants,
    out: str,
    run: bool = True,
    alignment_pairs: int | None = None,
    dpo_pairs: bool = False,
) -> list[dict]:
    """Run the demo of every seed at harmful share `share` for the methods not yet in `<out>`; returns every result.

    A seed's baselines and `u2a` run once (`<share dir>/seed<seed>/base`); the variants missing from every result
    of that seed run together in `<share dir>/seed<seed>/<variant names>`, so that a later call adds variants to
    the same seeds without rerunning what is there. `dpo_pairs` adds TRL's DPO on the alignment pairs alone (the
    demo's `dpo-pairs`, one run per seed and setting) to the baselines.
    """
    from trl_u2a.demo import DemoConfig, run_demo

    results = []
    for seed in seeds:
        seed_dir = os.path.join(share_dir(out, share, alignment_pairs), f"seed{seed}")
        done = {(r["setting"], r["loss"], r["method"]) for res in _seed_results(seed_dir) for r in res["runs"]}
        cells = [(s, loss) for s in settings for loss in losses]
        base = [m for m in ("u2a", "uniform", "oracle") if any((s, loss, m) not in done for s, loss in cells)]
        if dpo_pairs and any((s, "dpo", "dpo-pairs") not in done for s in settings):
            base.append("dpo-pairs")
        missing = [name for name in variants if any((s, loss, f"u2a-{name}") not in done for s, loss in cells)]
        if run and (base or missing):
            tag = "+".join(base) if base else "+".join(missing)
            tag = "base" if tag == "u2a+uniform+oracle" else tag
            config = DemoConfig(
                output_dir=os.path.join(seed_dir, tag),
                seeds=(seed,),
                harmful_share=None if share == 0.5 else share,
                alignment_pairs=alignment_pairs,
                settings=tuple(settings),
                losses=tuple(losses),
                methods=tuple(base),
                preconditioners=(),
                variants={f"u2a-{name}": VARIANTS[name] for name in missing},
                variant_losses=None,
                plots=False,
                progress=False,
                keep_traces=False,
            )
            run_demo(config)
            print(f"h{share:g} seed {seed} {tag} done", flush=True)
        results.extend(_seed_results(seed_dir))
    return results


def pooled(results: list[dict], min_seeds: int) -> list[dict]:
    """The demo's summary over the pooled runs of several one-seed demos, plus coverage and time against uniform."""
    from trl_u2a.demo.stats import bootstrap_recovery, paired_bootstrap_ci, recovery_share, summarize

    runs = list({(r["seed"], r["setting"], r["loss"], r["method"]): r for res in results for r in res["runs"]}.values())
    start = {k: v for res in results for k, v in res["start"].items()}
    kinds = {k: v for res in results for k, v in res["kinds"].items()}
    rows = summarize(runs, start, min_seeds=min_seeds)
    uniform_time = {}
    for r in runs:
        if r["method"] == "uniform":
            uniform_time[(r["seed"], r["setting"], r["loss"])] = r["train_seconds"]
    for row in rows:
        key = (row["setting"], row["loss"], row["method"])
        members = [r for r in runs if (r["setting"], r["loss"], r["method"]) == key and "error" not in r]
        coverage, ratio, initial, later = [], [], [], []
        for r in members:
            harmful = [i for i, kind in enumerate(kinds[str(r["seed"])]) if kind == "harmful"]
            if "weights" in r:
                coverage.append(sum(r["weights"][i] > 0 for i in harmful) / len(harmful))
            base = uniform_time.get((r["seed"], r["setting"], r["loss"]))
            if base:
                ratio.append(r["train_seconds"] / base)
            cost = r["history"][-1] if r.get("history") else {}
            if "initial_pass_multiple" in cost:
                initial.append(cost["initial_pass_multiple"])
                later.append(cost["reweight_share"])
        for name, values in (("coverage", coverage), ("time_vs_uniform", ratio), ("initial_pass_multiple", initial)):
            row[name] = sum(values) / len(values) if values else math.nan
        row["reweight_share"] = sum(later) / len(later) if later else math.nan
        # A candidate against the package defaults (`u2a`), paired by seed: what deciding a default needs
        defaults = {r["seed"]: r for r in runs if (r["setting"], r["loss"], r["method"]) == (*key[:2], "u2a")}
        # The share of the oracle's gain on the held-out pairs' DPO loss (the demo's own recoveries use J on the
        # alignment pairs, which the selection fits)
        by = {(r["seed"], r["method"]): r for r in runs if (r["setting"], r["loss"]) == key[:2] and "error" not in r}
        seeds = [r["seed"] for r in members if (r["seed"], "uniform") in by and (r["seed"], "oracle") in by]
        if row["method"] not in ("start", "uniform", "oracle") and seeds:
            cols = [[by[(seed, m)]["test_dpo_loss"] for seed in seeds] for m in ("uniform", row["method"], "oracle")]
            row["rec_test_dpo_loss"] = recovery_share(*cols)
            row["rec_test_dpo_loss_lo"], row["rec_test_dpo_loss_hi"] = bootstrap_recovery(*cols, min_pairs=min_seeds)
        # U2A against TRL's DPO on the same alignment pairs alone, paired by seed (the `dpo-pairs` run of the setting)
        dpo = {r["seed"]: r for r in runs if (r["setting"], r["method"]) == (key[0], "dpo-pairs") and "error" not in r}
        if row["method"].startswith("u2a") and dpo:
            for metric in ("test_dpo_loss", "harm_prob", "harmful_rate"):
                diffs = [r[metric] - dpo[r["seed"]][metric] for r in members if r["seed"] in dpo]
                row[f"vs_dpo_{metric}"] = sum(diffs) / len(diffs) if diffs else math.nan
                low, high = paired_bootstrap_ci(diffs, min_pairs=min_seeds)
                row[f"vs_dpo_{metric}_lo"], row[f"vs_dpo_{metric}_hi"] = low, high
        if row["method"].startswith("u2a-"):
            for metric in ("J", "test_dpo_loss", "harm_prob", "harmful_rate"):
                diffs = [r[metric] - defaults[r["seed"]][metric] for r in members if r["seed"] in defaults]
                row[f"vs_u2a_{metric}"] = sum(diffs) / len(diffs) if diffs else math.nan
                low, high = paired_bootstrap_ci(diffs, min_pairs=min_seeds)
                row[f"vs_u2a_{metric}_lo"], row[f"vs_u2a_{metric}_hi"] = low, high
    return rows


def _fmt(row: dict, key: str, digits: int = 2) -> str:
    value, low, high = row.get(key, math.nan), row.get(f"{key}_lo", math.nan), row.get(f"{key}_hi", math.nan)
    if not isinstance(value, float) or math.isnan(value):
        return "-"
    return f"{value:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.15])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--settings", nargs="+", default=["lora"])
    parser.add_argument("--losses", nargs="+", default=["ga", "npo"])
    parser.add_argument("--variants", nargs="*", default=["pa_all"], choices=sorted(VARIANTS))
    parser.add_argument("--min-seeds", type=int, default=3, help="Fewest seeds that get a bounded interval.")
    parser.add_argument("--out", default="bench-base-rates")
    parser.add_argument("--report-only", action="store_true", help="Pool the results there are; run nothing.")
    parser.add_argument(
        "--alignment-pairs", type=int, help="U2A gets this many of the 80 alignment pairs (DemoConfig.alignment_pairs)."
    )
    parser.add_argument(
        "--dpo-pairs", action="store_true", help="Also run TRL's DPO on the alignment pairs alone (demo: dpo-pairs)."
    )
    args = parser.parse_args(argv)
    common.set_threads(1)
    summary = {}
    for share in args.shares:
        results = run_share(
            share,
            args.seeds,
            args.settings,
            args.losses,
            args.variants,
            args.out,
            run=not args.report_only,
            alignment_pairs=args.alignment_pairs,
            dpo_pairs=args.dpo_pairs,
        )
        rows = pooled(results, args.min_seeds)
        summary[f"{share:g}"] = rows
        seeds = sorted({r["seed"] for res in results for r in res["runs"]})
        pairs = f"{args.alignment_pairs} alignment pairs" if args.alignment_pairs else "80 alignment pairs"
        print(f"\nharmful share {share:g}, {pairs}, seeds {seeds}")
        print(
            "setting | loss | method | recovered harm | recovered harm prob | recovered J | recovered test J | "
            "d harmful rate | "
            "precision | coverage | "
            "time vs uniform | initial pass | later refreshes | vs defaults: d J | d test J | d harm prob | "
            "vs dpo-pairs: d test J | d harm prob | d harmful rate"
        )
        for row in rows:
            if row["method"] in ("start", "uniform"):
                continue
            print(
                f"{row['setting']} | {row['loss']} | {row['method']} | {_fmt(row, 'rec_harmful_rate')} | "
                f"{_fmt(row, 'rec_harm_prob')} | {_fmt(row, 'rec_J')} | {_fmt(row, 'rec_test_dpo_loss')} | "
                f"{_fmt(row, 'd_harmful_rate')} | "
                f"{row.get('sel_harmful', math.nan):.2f} | "
                f"{row['coverage']:.2f} | {row['time_vs_uniform']:.2f}x | {row['initial_pass_multiple']:.2f}x | "
                f"{row['reweight_share']:.1%} | {_fmt(row, 'vs_u2a_J', 3)} | "
                f"{_fmt(row, 'vs_u2a_test_dpo_loss', 3)} | {_fmt(row, 'vs_u2a_harm_prob', 3)} | "
                f"{_fmt(row, 'vs_dpo_test_dpo_loss', 3)} | {_fmt(row, 'vs_dpo_harm_prob', 3)} | "
                f"{_fmt(row, 'vs_dpo_harmful_rate', 3)}"
            )
    name = f"summary-p{args.alignment_pairs}.json" if args.alignment_pairs else "summary.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(common_jsonable(summary), f, indent=1)
    return 0


def common_jsonable(obj):
    from trl_u2a.demo.common import jsonable

    return jsonable(obj)


if __name__ == "__main__":
    sys.exit(main())
