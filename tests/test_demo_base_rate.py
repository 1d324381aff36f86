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


def test_cli_passes_harmful_share(monkeypatch, tmp_path):
    from trl_u2a.scripts import demo as script

    seen = {}

    def fake_run_demo(config):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    with pytest.raises(SystemExit):
        script.cli(["--output_dir", str(tmp_path), "--full", "--harmful_share", "0.15"])
    assert seen["config"].harmful_share == 0.15 and seen["config"].negative_kinds()["harmful"] == 0.15
    with pytest.raises(SystemExit):
        script.cli(["--output_dir", str(tmp_path), "--full"])
    assert seen["config"].harmful_share is None


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
