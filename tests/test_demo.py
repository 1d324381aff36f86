"""The offline benchmark (`trl_u2a.demo`): judge, metrics, summaries, CLI, and a miniature end-to-end pipeline."""

import json
import math

import pytest

from trl_u2a import demo
from trl_u2a.demo import DemoConfig
from trl_u2a.synthetic import make_u2a_task


@pytest.fixture(scope="module")
def task():
    return make_u2a_task(seed=0)


def test_judge_flags_the_harmful_kind_and_not_the_chosen_responses(task):
    forget = task["forget"]
    harmful = [r["completion"] for r in forget if r["kind"] == "harmful"]
    harmless = [r["completion"] for r in forget if r["kind"] != "harmful"]
    chosen = list(task["retain"]["completion"]) + list(task["alignment"]["chosen"])
    assert min(demo.judge_harm(harmful)) >= 0.5
    assert max(demo.judge_harm(chosen)) < 0.5
    assert max(demo.judge_harm(harmless)) < 0.5
    assert demo.judge_harm([]) == []


def test_degenerate_generations_are_recognised(task):
    vocabulary = {w for t in task["retain"]["completion"] for w in demo._WORD_RE.findall(t.lower())}
    assert demo.degenerate("", vocabulary)
    assert demo.degenerate(",,,,,,,,,,,,", vocabulary)
    assert demo.degenerate(", and, and, and, and,, and then,", vocabulary)
    assert demo.degenerate("er qoleryai vlur snep tab", vocabulary)
    assert not any(demo.degenerate(t, vocabulary) for t in task["retain"]["completion"])


def test_selection_metrics_count_kinds_and_mass():
    kinds = ["harmful", "harmful", "low_quality", "near_copy"]
    out = demo.selection_metrics([3.0, 1.0, 0.0, 0.0], kinds)
    assert out["n_selected"] == 2 and out["sel_harmful"] == 1.0 and out["mass_harmful"] == 1.0
    out = demo.selection_metrics([1.0, 0.0, 3.0, 0.0], kinds)
    assert out["sel_harmful"] == out["sel_low_quality"] == 0.5
    assert out["mass_low_quality"] == 0.75 and out["sel_near_copy"] == 0.0
    assert math.isnan(demo.selection_metrics([0.0] * 4, kinds)["sel_harmful"])


def test_random_subset_and_oracle_weights():
    subset = demo.random_subset(10, 0.3, seed=1)
    assert subset == demo.random_subset(10, 0.3, seed=1) and sorted(set(subset)) == [0.0, 1.0] and sum(subset) == 3
    assert demo.oracle_weights(["harmful", "near_copy", "harmful"]) == [1.0, 0.0, 1.0]


def test_dpo_pairs_use_alignment_pairs_and_same_prompt_chosen(task):
    pairs = demo.dpo_pairs(task)
    assert len(pairs) > len(task["alignment"])
    chosen_of = {}
    for row in task["retain"]:
        chosen_of.setdefault(row["prompt"], set()).add(row["completion"])
    forget = set(task["forget"]["completion"])
    for row in pairs.select(range(len(task["alignment"]), len(pairs))):
        assert row["chosen"] in chosen_of[row["prompt"]] and row["rejected"] in forget


def _run(seed, method, harm, ppl, loss="npo", lr=1e-4, degenerate=0.0, steps=((10, 0.9),)):
    trajectory = [{"step": 0, "harmful_rate": 0.5, "retain_ppl": 2.0, "degenerate_rate": 0.0}]
    trajectory += [
        {"step": s, "harmful_rate": harm + 0.1 * f, "retain_ppl": ppl * f, "degenerate_rate": degenerate}
        for s, f in steps
    ]
    trajectory.append({"step": 20, "harmful_rate": harm, "retain_ppl": ppl, "degenerate_rate": degenerate})
    return {
        "seed": seed,
        "lr": lr,
        "loss": loss,
        "method": method,
        "harmful_rate": harm,
        "retain_ppl": ppl,
        "J": 0.5,
        "pref_acc": 0.8,
        "collapsed": degenerate > 0.5,
        "trajectory": trajectory,
    }


def test_summary_pairs_against_uniform_and_claim():
    runs = [
        _run(0, "uniform", 0.30, 2.4),
        _run(1, "uniform", 0.20, 2.6),
        _run(0, "u2a", 0.20, 2.3),
        _run(1, "u2a", 0.16, 2.5),
        _run(0, "oracle", 0.40, 9.0, degenerate=0.9),
        _run(1, "oracle", 0.40, 9.0, degenerate=0.9),
    ]
    rows = {r["method"]: r for r in demo.summarize(runs)}
    assert rows["u2a"]["harmful_rate"] == pytest.approx(0.18)
    assert rows["u2a"]["d_harmful_rate"] == pytest.approx(-0.07)  # mean of -0.10 and -0.04
    assert rows["u2a"]["d_harmful_rate_std"] == pytest.approx(math.sqrt(2 * 0.03**2))
    assert rows["u2a"]["d_retain_ppl"] == pytest.approx(-0.1)
    assert math.isnan(rows["uniform"]["d_harmful_rate"]) and rows["oracle"]["collapsed"] == 2
    claims = {c["method"]: c for c in demo.claim(demo.summarize(runs))}
    assert claims["u2a"]["holds"] and not claims["u2a"]["void"]

    config = DemoConfig(ppl_budgets=(1.1, 2.0))
    front = {r["method"]: r for r in demo.frontier(runs, config)}
    # ppl ≤ 1.1 × 2.0: the start model (harm 0.5) and the step-10 points of uniform seed 0 (ppl 2.16, harm 0.39) and
    # u2a seed 0 (ppl 2.07, harm 0.29) qualify; seed 1's step-10 points are above the budget
    assert front["uniform"]["harm@1.1"] == pytest.approx((0.39 + 0.5) / 2)
    assert front["u2a"]["harm@1.1"] == pytest.approx((0.29 + 0.5) / 2)
    assert front["u2a"]["d_harm@1.1"] == pytest.approx((-0.10 + 0.0) / 2)
    assert front["u2a"]["harm@2"] == pytest.approx(0.18) and front["u2a"]["d_harm@2"] == pytest.approx(-0.07)
    # degenerate points never qualify: the judge cannot be trusted on them
    assert front["oracle"]["harm@2"] == pytest.approx(0.5)
    assert "harm@ppl≤2×" in demo.format_frontier(list(front.values()), (1.1, 2.0))


def test_cli_maps_arguments_to_the_config(monkeypatch, tmp_path, capsys):
    from trl_u2a.scripts import demo as script

    seen = {}

    def fake_run_demo(config):
        seen["config"] = config
        row = {"lr": 1e-4, "loss": "npo", "method": "u2a", "n": 1, "collapsed": 0}
        return {
            "runs": [],
            "summary": [row],
            "frontier": [{"loss": "npo", "method": "u2a", "n": 1}],
            "claim": [
                {
                    "lr": 1e-4,
                    "loss": "npo",
                    "method": "u2a",
                    "d_harmful_rate": -0.1,
                    "d_retain_ppl": 0.0,
                    "void": False,
                    "holds": True,
                }
            ],
            "timing": {"total": 1.0, "start_models": 0.1, "training": 0.5, "evaluation": 0.2},
            "plots": ["harm_vs_ppl.png"],
        }

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert script.cli(["--output_dir", str(tmp_path), "--full", "--seeds", "3", "4", "--no_plots"]) == 0
    config = seen["config"]
    assert config.seeds == (3, 4) and config.output_dir == str(tmp_path) and not config.plots
    assert config.untempered and config.learning_rates == DemoConfig.full().learning_rates
    out = capsys.readouterr().out
    assert "results.json" in out and "holds" in out and "harm_vs_ppl.png" in out
    script.cli(["--quick", "--learning_rates", "0.01", "--steps", "3"])
    assert seen["config"].learning_rates == (0.01,) and seen["config"].steps == 3 and seen["config"].n_prompts == 30
    with pytest.raises(SystemExit):
        script.cli(["--quick", "--full"])


def test_config_rejects_unknown_methods_and_losses():
    with pytest.raises(ValueError, match="methods"):
        DemoConfig(methods=("u2a", "kto"))
    with pytest.raises(ValueError, match="losses"):
        DemoConfig(losses=("graddiff2",))
    variants = DemoConfig.full().u2a_variants("npo")
    assert set(variants) == {"u2a", "u2a-select", "u2a-fisher", "u2a-w1", "u2a-untempered", "u2a-b0.25"}
    assert set(DemoConfig.full().u2a_variants("ga")) == {"u2a", "u2a-select", "u2a-fisher"}


@pytest.mark.slow
def test_miniature_pipeline_runs_every_method_and_reports_every_metric(tmp_path):
    # The quick start model is barely trained: its generations are mostly degenerate, so the frontier would have no
    # eligible point; collapse_degenerate=1.0 keeps the plumbing testable.
    config = DemoConfig.quick(
        output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), progress=False, collapse_degenerate=1.0
    )
    results = demo.run_demo(config)

    methods = {r["method"] for r in results["runs"]}
    assert methods == {
        "uniform",
        "random",
        "oracle",
        "u2a",
        "u2a-select",
        "u2a-fisher",
        "u2a-w1",
        "u2a-untempered",
        "u2a-b0.25",
        "dpo",
    }
    for run in results["runs"]:
        for key in (
            "harmful_rate",
            "harm_prob",
            "degenerate_rate",
            "retain_ppl",
            "J",
            "test_dpo_loss",
            "pref_acc",
            "reward_acc",
            "collapsed",
            "samples",
        ):
            assert key in run, (run["name"], key)
        assert math.isfinite(run["retain_ppl"]) and 0 <= run["harmful_rate"] <= 1
        assert [p["step"] for p in run["trajectory"]] == [0, 2, 4]
        if run["method"] != "dpo":
            for key in ("n_selected", "sel_harmful", "sel_low_quality", "sel_near_copy", "mass_harmful"):
                assert key in run, (run["name"], key)
    by_method = {r["method"]: r for r in results["runs"]}
    assert by_method["oracle"]["sel_harmful"] == 1.0
    assert by_method["uniform"]["n_selected"] == by_method["uniform"]["n_negatives"]
    assert by_method["random"]["n_selected"] == round(config.budget * by_method["random"]["n_negatives"])
    assert by_method["u2a"]["history"] and by_method["u2a"]["history"][0]["step"] == 0
    assert (tmp_path / "out" / by_method["u2a"]["trace"]).is_file()

    uniform = by_method["uniform"]
    assert by_method["u2a"]["harmful_rate"] - uniform["harmful_rate"] == pytest.approx(
        next(r for r in results["summary"] if r["method"] == "u2a")["d_harmful_rate"]
    )
    assert all(math.isfinite(r["harm@1.25"]) for r in results["frontier"])
    assert {c["method"] for c in results["claim"]} >= {"u2a", "u2a-select"}

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["runs"]) == len(results["runs"]) and "timing" in saved
    for plot in ("harm_vs_ppl.png", "trajectories.png", "refreshes.png"):
        assert (tmp_path / "out" / plot).stat().st_size > 1000
    assert "Δ vs uniform" in (tmp_path / "out" / "table.md").read_text()

    # The start model is cached by its settings, and the memorisation check also runs on a cached model
    splits = demo.load_task(0, config)
    assert demo.start_model(0, config, splits).cached
    with pytest.raises(demo.MemorisedStartModelError, match="memorised"):
        demo.start_model(0, DemoConfig.quick(cache_dir=config.cache_dir, min_start_nll=100.0), splits)
    with pytest.warns(UserWarning, match="memorised"):
        flagged = demo.start_model(
            0, DemoConfig.quick(cache_dir=config.cache_dir, min_start_nll=100.0, allow_memorised=True), splits
        )
    assert flagged.info["memorised"]
