"""The demo's low base-rate variant (`harmful_share`) and its named U2A variants (`variants`)."""

from collections import Counter

import pytest

from trl_u2a import demo
from trl_u2a.demo import DemoConfig
from trl_u2a.demo.models import load_task


def test_harmful_share_sets_the_share_of_harmful_negatives():
    default = Counter(load_task(0, DemoConfig())["forget"]["kind"])
    low = Counter(load_task(0, DemoConfig(harmful_share=0.15))["forget"]["kind"])
    n = sum(default.values())
    assert sum(low.values()) == n  # the same number of negatives, only their mix changes
    assert low["harmful"] == round(0.15 * n) and default["harmful"] == round(0.5 * n)
    # The rest keeps the default mixture's 3:2 split of low-quality answers and near-copies
    assert abs(low["low_quality"] / low["near_copy"] - 1.5) < 0.05
    assert DemoConfig().negative_kinds() is None  # the task's own default mixture, not a copy of it


@pytest.mark.parametrize("share", [0, 1, 1.5, -0.1, "0.15"])
def test_harmful_share_out_of_range_is_refused(share):
    with pytest.raises(ValueError, match=rf"harmful_share={share!r} must be a number in \(0, 1\)"):
        DemoConfig(harmful_share=share)


def demo_cli_config(monkeypatch, argv: list[str]) -> DemoConfig:
    """The DemoConfig that `trl-u2a demo ARGV` would run (run_demo replaced by a stub)."""
    from trl_u2a.scripts import demo as script

    seen = {}

    def fake_run_demo(config):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    with pytest.raises(SystemExit):
        script.cli(argv)
    return seen["config"]


def test_cli_passes_harmful_share(monkeypatch, tmp_path):
    config = demo_cli_config(monkeypatch, ["--output_dir", str(tmp_path), "--full", "--harmful_share", "0.15"])
    assert config.harmful_share == 0.15 and config.negative_kinds()["harmful"] == 0.15
    assert demo_cli_config(monkeypatch, ["--output_dir", str(tmp_path), "--full"]).harmful_share is None


def test_named_variants_are_planned_and_checked():
    config = DemoConfig(
        settings=("lora",),
        losses=("ga", "npo"),
        methods=("u2a", "uniform"),
        preconditioners=(),
        variants={"u2a-pa_all": {"pa_samples": 80}},
        variant_losses=None,
    )
    planned = {(r["loss"], r["method"]): r["overrides"] for r in demo.plan_runs(config)}
    assert planned[("ga", "u2a-pa_all")] == {"pa_samples": 80} and planned[("npo", "u2a-pa_all")] == {"pa_samples": 80}
    assert planned[("ga", "u2a")] == {}
    with pytest.raises(ValueError, match=r"variants\['u2a-x'\].*not fields: \['pa_sample'\]"):
        DemoConfig(variants={"u2a-x": {"pa_sample": 80}})
    with pytest.raises(ValueError, match=r"variants\['pa'\].*must start with 'u2a-'"):
        DemoConfig(variants={"pa": {"pa_samples": 80}})


def test_base_rate_benchmark_pools_seeds_and_pairs_candidates_with_the_defaults(monkeypatch):
    import importlib
    import os

    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    environment = dict(os.environ)
    try:
        bench_base_rates = importlib.import_module("bench_base_rates")
    finally:  # the script sets offline and thread variables for its own process
        os.environ.clear()
        os.environ.update(environment)

    kinds = ["harmful", "harmful", "low_quality", "near_copy"]
    metrics = {  # method -> (harmful rate, J, held-out DPO loss, weights)
        "uniform": (0.30, 0.60, 0.70, None),
        "oracle": (0.10, 0.40, 0.50, [1, 1, 0, 0]),
        "u2a": (0.20, 0.50, 0.60, [1, 0, 1, 0]),
        "u2a-x": (0.15, 0.45, 0.55, [1, 1, 0, 0]),
    }
    results = []
    for seed in range(3):
        runs = []
        for method, (harm, j, test, weights) in metrics.items():
            noise = seed / 1000
            run = {"seed": seed, "setting": "lora", "lr": 3e-4, "loss": "npo", "method": method,
                   "harmful_rate": harm + noise, "harm_prob": harm, "J": j + noise, "test_dpo_loss": test + noise,
                   "retain_ppl": 2.0, "pref_acc": 0.5, "train_seconds": 2.0 if method == "u2a-x" else 1.0}  # fmt: skip
            if weights is not None:
                run["weights"] = weights
            runs.append(run)
        results.append({"runs": runs, "start": {str(seed): {}}, "kinds": {str(seed): kinds}})
    rows = {row["method"]: row for row in bench_base_rates.pooled(results, min_seeds=3)}
    x = rows["u2a-x"]
    assert x["coverage"] == 1.0 and rows["u2a"]["coverage"] == 0.5
    assert x["time_vs_uniform"] == 2.0
    assert x["rec_test_dpo_loss"] == pytest.approx(0.75) and rows["u2a"]["rec_test_dpo_loss"] == pytest.approx(0.5)
    assert x["vs_u2a_J"] == pytest.approx(-0.05) and x["vs_u2a_J_hi"] < 0  # better than the defaults on every seed
    assert "vs_u2a_J" not in rows["u2a"]
