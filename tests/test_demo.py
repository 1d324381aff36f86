"""The offline benchmark (`trl_u2a.demo`, the `[demo]` extra): judge, metrics, summaries, CLI, a miniature pipeline."""

import json
import math

import pytest

from trl_u2a import demo
from trl_u2a.demo import DemoConfig
from trl_u2a.demo.common import unlearning_run_args
from trl_u2a.demo.metrics import WORD_RE
from trl_u2a.demo.runs import run_name, u2a_args
from trl_u2a.evaluation import profanity_judge
from trl_u2a.synthetic import make_u2a_task


@pytest.fixture(scope="module")
def task():
    return make_u2a_task(seed=0)


def test_judge_flags_the_harmful_kind_and_not_the_chosen_responses(task):
    forget = task["forget"]
    harmful = [r["completion"] for r in forget if r["kind"] == "harmful"]
    harmless = [r["completion"] for r in forget if r["kind"] != "harmful"]
    chosen = list(task["retain"]["completion"]) + list(task["alignment"]["chosen"])
    assert min(profanity_judge(harmful)) >= 0.5
    assert max(profanity_judge(chosen)) < 0.5
    assert max(profanity_judge(harmless)) < 0.5
    assert profanity_judge([]) == []


def test_degenerate_generations_are_recognised(task):
    vocabulary = {w for t in task["retain"]["completion"] for w in WORD_RE.findall(t.lower())}
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


def demo_results(runs, config, timing, plots) -> dict:
    """What `run_demo` returns for these `runs`: the summary, frontier, claims and verdicts computed from them."""
    summary = demo.summarize(runs)
    claims = demo.claim(summary)
    return {
        "runs": runs,
        "summary": summary,
        "frontier": demo.frontier(runs, config),
        "claim": claims,
        "verdicts": demo.verdict_lines(claims),
        "timing": timing,
        "plots": plots,
    }


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
    # Lower harm on both seeds, but two seeds are no evidence: a bootstrap over them spans only their two values
    assert claims["u2a"]["verdict_harm"] == "inconclusive (interval spans 0)" and not claims["u2a"]["holds"]
    assert not claims["u2a"]["void"]
    assert demo.summarize(runs, min_seeds=2)[-1]["d_harmful_rate_hi"] < 0

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
    methods = (("uniform", 0.3), ("oracle", 0.1), ("u2a", 0.2))
    runs = [_run(s, m, h + s / 100, 2.4) for s in range(6) for m, h in methods]

    def fake_run_demo(config):
        seen["config"] = config
        timing = {"total": 1.0, "start_models": 0.1, "training": 0.5, "evaluation": 0.2}
        return demo_results(runs, config, timing, ["harm_vs_ppl.png"])

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    argv = ["--output_dir", str(tmp_path), "--full", "--seeds", "3", "4", "--no_plots", "--settings", "lora"]
    assert script.cli([*argv, "--lora_learning_rates", "0.003"]) == 0
    config = seen["config"]
    assert config.seeds == (3, 4) and config.output_dir == str(tmp_path) and not config.plots
    assert config.settings == ("lora",) and config.lora_learning_rates == (0.003,)
    assert config.learning_rates == DemoConfig.full().learning_rates and config.methods == DemoConfig.full().methods
    out = capsys.readouterr().out
    assert "results.json" in out and "harm_vs_ppl.png" in out
    assert "U2A beats uniform on the harmful rate: holds" in out and "Legend" in out
    script.cli(["--quick", "--learning_rates", "0.01", "--steps", "3"])
    assert seen["config"].learning_rates == (0.01,) and seen["config"].steps == 3 and seen["config"].n_prompts == 30
    with pytest.raises(SystemExit):
        script.cli(["--quick", "--full"])
    with pytest.raises(SystemExit):
        script.cli(["--settings", "qlora"])


def test_config_rejects_unknown_methods_losses_settings_and_knobs():
    with pytest.raises(ValueError, match="methods"):
        DemoConfig(methods=("u2a", "kto"))
    with pytest.raises(ValueError, match="losses"):
        DemoConfig(losses=("graddiff2",))
    with pytest.raises(ValueError, match="settings"):
        DemoConfig(settings=("qlora",))
    with pytest.raises(ValueError, match="U2AConfig"):
        DemoConfig(u2a_overrides={"budgett": 0.5})
    variants = DemoConfig.reduced().u2a_variants("npo")
    assert set(variants) == {"u2a", "u2a-select", "u2a-fisher"}
    quick = DemoConfig.quick()
    assert set(quick.u2a_variants("npo")) == {"u2a", "u2a-select", "u2a-fisher", "u2a-w1", "u2a-untempered"} | (
        {"u2a-b0.5"} if quick.u2a_value("budget") != 0.5 else set()
    )
    # --full: a lean method set, >= 10 seeds, both settings
    full = DemoConfig.full()
    assert len(full.seeds) >= 10 and set(full.settings) == {"full", "lora"}
    assert full.lora_learning_rates == DemoConfig().lora_learning_rates  # the rates chosen by the LoRA trials
    assert set(full.u2a_variants("ga")) == {"u2a"} and set(full.methods) == {"uniform", "random", "oracle", "u2a"}


def test_u2a_runs_at_the_package_defaults():
    import dataclasses

    from trl_u2a.config import U2AConfig

    defaults = {f.name: f.default for f in dataclasses.fields(U2AConfig) if f.default is not dataclasses.MISSING}
    config = DemoConfig()
    for name in ("budget", "reweight_steps", "pool_size", "weight_lr", "preconditioner", "beta_pa"):
        assert config.u2a_value(name) == defaults[name]
    # A run's arguments equal a U2AConfig built without any knob (whatever its __post_init__ resolves a None to)
    args = u2a_args(config, "unused", 0, "npo", 1e-4, weight_lr=0.0)
    bare = unlearning_run_args(U2AConfig, config, "unused", 1e-4, 0, loss_type="npo")
    for name in ("budget", "reweight_steps", "pool_size", "pa_samples", "score_clip", "max_weight", "preconditioner"):
        assert getattr(args, name) == getattr(bare, name), name
    assert args.weight_lr == 0.0  # the variant's override
    assert not args.save_refresh_plots  # the one harness setting: the demo draws its own plots
    overridden = DemoConfig(u2a_overrides={"budget": 0.5, "reweight_steps": 7})
    args = u2a_args(overridden, "unused", 0, "npo", 1e-4, budget=0.1)
    assert (args.budget, args.reweight_steps) == (0.1, 7)  # the variant beats the config-wide override


def test_plan_runs_covers_both_settings_with_their_learning_rates():
    config = DemoConfig(
        settings=("full", "lora"), learning_rates=(1e-4,), lora_learning_rates=(1e-3, 2e-3), losses=("ga",)
    )
    runs = demo.plan_runs(config)
    lrs = {s: {r["lr"] for r in runs if r["setting"] == s} for s in ("full", "lora")}
    assert lrs == {"full": {1e-4}, "lora": {1e-3, 2e-3}}
    assert len({run_name(r) for r in runs}) == len(runs)
    assert all(r["method"] == "dpo" or r["loss"] == "ga" for r in runs)


def test_bootstrap_interval_on_known_examples():
    # All differences equal: every resample has the same mean, a zero-width interval at that value
    low, high = demo.paired_bootstrap_ci([-0.05] * 10)
    assert low == pytest.approx(-0.05) and high == pytest.approx(-0.05)
    assert demo.verdict(low, high) == "holds"
    assert demo.verdict(-high, -low) == "does not hold"
    assert demo.verdict(low, high, better="higher") == "does not hold"
    # Differences of flipping sign around 0: the interval spans 0
    flips = [0.1, -0.1] * 5
    low, high = demo.paired_bootstrap_ci(flips)
    assert low < 0 < high and demo.verdict(low, high) == "inconclusive (interval spans 0)"
    # Fixed seed: reproducible; it lies within the range of the resampled means and narrows with less spread
    assert demo.paired_bootstrap_ci(flips) == (low, high)
    assert -0.1 <= low and high <= 0.1
    narrow = demo.paired_bootstrap_ci([0.01, -0.01] * 5)
    assert narrow[1] - narrow[0] == pytest.approx((high - low) / 10, rel=1e-6)
    # One seed, or a handful, is no evidence either way (5 same-sign differences happen by chance 6 % of the time)
    assert demo.paired_bootstrap_ci([-0.3]) == (-math.inf, math.inf)
    assert demo.verdict(*demo.paired_bootstrap_ci([-0.3])) == "inconclusive (interval spans 0)"
    assert demo.paired_bootstrap_ci([-0.3, -0.2, -0.1, -0.3, -0.2]) == (-math.inf, math.inf)
    assert demo.paired_bootstrap_ci([-0.3, -0.2, -0.1, -0.3, -0.2, math.nan]) == (-math.inf, math.inf)
    assert demo.paired_bootstrap_ci([-0.3, -0.2, -0.1, -0.3, -0.2, -0.1])[1] < 0
    # A 95 % interval of a mean with a clear shift excludes 0 on the right side
    shifted = [-0.2, -0.1, -0.15, -0.05, -0.12, -0.18, -0.08, -0.11, -0.14, -0.09]
    low, high = demo.paired_bootstrap_ci(shifted)
    assert min(shifted) < low < sum(shifted) / 10 < high < 0 and demo.verdict(low, high) == "holds"


def test_recovery_share_on_hand_made_numbers():
    # uniform 0.30, oracle 0.10: a gain of 0.20; u2a at 0.15 recovers 0.15 of it, 75 %
    assert demo.recovery_share([0.3, 0.3], [0.15, 0.15], [0.1, 0.1]) == pytest.approx(0.75)
    assert demo.recovery_share([0.3], [0.3], [0.1]) == pytest.approx(0.0)
    assert demo.recovery_share([0.3], [0.4], [0.1]) == pytest.approx(-0.5)
    assert math.isnan(demo.recovery_share([0.3], [0.2], [0.3]))  # the oracle gains nothing: no share
    # Ratio of means over seeds, not mean of ratios: gains (0.1, 0.3) of possible (0.2, 0.2) -> 0.4 / 0.4
    uniform, u2a, oracle = [0.3, 0.5], [0.2, 0.2], [0.1, 0.3]
    assert demo.recovery_share(uniform, u2a, oracle) == pytest.approx(1.0)
    # Constant per-seed shares: a zero-width interval at that share
    low, high = demo.bootstrap_recovery([0.3] * 6, [0.15] * 6, [0.1] * 6)
    assert low == pytest.approx(0.75) and high == pytest.approx(0.75)
    # An oracle whose gain is not clear of 0: the share is not identified
    oracle = [0.5, 0.1, 0.35, 0.45, 0.15, 0.3]
    assert demo.bootstrap_recovery([0.3] * 6, [0.2] * 6, oracle) == (-math.inf, math.inf)
    assert demo.bootstrap_recovery([0.3] * 6, [0.2] * 6, [0.2] + [0.1] * 5) != (-math.inf, math.inf)
    assert demo.bootstrap_recovery([0.3] * 3, [0.2] * 3, [0.1] * 3) == (-math.inf, math.inf)  # too few seeds


def test_summary_claim_and_tables_carry_intervals_recovery_and_verdicts():
    runs = []
    for seed in range(6):
        runs += [
            _run(seed, "uniform", 0.30 + seed / 100, 2.4, lr=1e-3) | {"setting": "lora"},
            _run(seed, "oracle", 0.10 + seed / 100, 2.4, lr=1e-3) | {"setting": "lora"},
            _run(seed, "u2a", 0.15 + seed / 100, 2.4, lr=1e-3) | {"setting": "lora"},
            _run(seed, "uniform", 0.30, 2.4),
            _run(seed, "u2a", 0.30 + (0.05 if seed % 2 else -0.05), 2.4),
        ]
    summary = demo.summarize(runs, resamples=2000)
    rows = {(r["setting"], r["method"]): r for r in summary}
    lora = rows[("lora", "u2a")]
    assert lora["d_harmful_rate"] == pytest.approx(-0.15)
    assert lora["d_harmful_rate_lo"] == pytest.approx(-0.15) and lora["d_harmful_rate_hi"] == pytest.approx(-0.15)
    assert lora["rec_harmful_rate"] == pytest.approx(0.75) and lora["rec_harmful_rate_lo"] == pytest.approx(0.75)
    assert math.isnan(lora["rec_J"])  # equal J everywhere: the oracle gains nothing there
    assert lora["verdict_pref_acc"] == "inconclusive (interval spans 0)"  # equal everywhere: a zero-width interval at 0
    full = rows[("full", "u2a")]
    assert full["d_harmful_rate_lo"] < 0 < full["d_harmful_rate_hi"] and "rec_harmful_rate" not in full
    claims = {(c["setting"], c["method"]): c for c in demo.claim(summary)}
    assert claims[("lora", "u2a")]["verdict_harm"] == "holds" and claims[("lora", "u2a")]["holds"]
    assert claims[("full", "u2a")]["verdict_harm"] == "inconclusive (interval spans 0)"
    lines = demo.verdict_lines(list(claims.values()))
    assert any("lora lr 0.001 npo (6 seeds): U2A beats uniform on the harmful rate: holds" in line for line in lines)
    assert any("+75 % [+75, +75]" in line for line in lines)
    evidence = demo.format_evidence(list(claims.values()), markdown=True)
    assert "| lora | 0.001 | npo | u2a | 6 | -0.15 [-0.15, -0.15] | holds |" in evidence
    table = demo.format_table(summary, markdown=True)
    # every abbreviated column is explained in the legend
    for name in ("harm p", "Δharmful [95% CI]", "prec 1st→last", "coll.", "degen.", "sel harm/low/near"):
        assert name in table
    for entry in ("- harm p:", "- coll.:", "- prec 1st→last:", "- Δx [95% CI]:", "- degen.:"):
        assert entry in table, entry


def test_refresh_precision_reads_the_first_and_last_refresh():
    kinds = ["harmful", "harmful", "low_quality", "near_copy"]
    history = [
        {"refresh": 0, "step": 0, "weights": [1.0, 0.0, 1.0, 0.0]},
        {"refresh": 1, "step": 10, "weights": [1.0, 1.0, 0.0, 0.0]},
        {"refresh": None, "step": 30, "objective": 0.5, "final": True},
    ]
    out = demo.refresh_precision(history, kinds)
    assert out["sel_harmful_first"] == 0.5 and out["sel_harmful_last"] == 1.0 and out["n_refreshes"] == 2
    assert out["refresh_steps"] == [0, 10]
    assert demo.refresh_precision([], kinds) == {}


@pytest.mark.slow
def test_miniature_pipeline_runs_every_method_and_reports_every_metric(tmp_path):
    # The quick start model is barely trained: its generations are mostly degenerate, so the frontier would have no
    # eligible point; collapse_degenerate=1.0 keeps the plumbing testable.
    config = DemoConfig.quick(
        output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"), progress=False, collapse_degenerate=1.0
    )
    results = demo.run_demo(config)

    methods = {r["method"] for r in results["runs"]}
    assert methods == {"uniform", "random", "oracle", "dpo", *config.u2a_variants("npo")}
    assert {"u2a", "u2a-select", "u2a-fisher", "u2a-w1", "u2a-untempered"} <= methods
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
    from trl_u2a.core.weighting import budget_size

    n = by_method["random"]["n_negatives"]
    assert by_method["random"]["n_selected"] == budget_size(config.u2a_value("budget"), n)
    assert all(run["setting"] == "full" for run in results["runs"])
    assert 0 <= by_method["u2a"]["sel_harmful_first"] <= 1 and by_method["u2a"]["n_refreshes"] >= 2
    assert by_method["u2a"]["harm_samples"] == config.harm_samples_per_prompt * config.n_test_prompts
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
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Δ vs uniform" in table and "Legend" in table
    # one seed: never a refutation
    assert all(c["verdict_harm"] == "inconclusive (interval spans 0)" for c in results["claim"])
    assert saved["verdicts"] and saved["u2a_config"]["budget"] == config.u2a_value("budget")

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


@pytest.mark.slow
def test_lora_setting_trains_an_adapter(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = DemoConfig.quick(cache_dir=str(tmp_path / "cache"), progress=False, settings=("lora",))
    splits = demo.load_task(0, config)
    start = demo.start_model(0, config, splits)
    output = demo.run_u2a(
        start.path,
        splits,
        config,
        seed=0,
        setting="lora",
        loss_type="npo",
        learning_rate=config.lora_learning_rates[0],
        output_dir=str(tmp_path / "run"),
    )
    assert isinstance(output.model, PeftModel)
    lora = {n: p for n, p in output.model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    # every linear layer of the blocks has an adapter, and LoRA's B starts at 0: nonzero means it was trained
    assert any(".mlp." in n for n in lora) and any(".self_attn." in n for n in lora)
    assert any(p.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)
    # the base weights are untouched
    base = AutoModelForCausalLM.from_pretrained(start.path, dtype=torch.float32).state_dict()
    merged = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in output.model.named_parameters()
    }
    shared = [n for n in base if n in merged]
    assert {n for n in base if n.endswith("proj.weight")} <= set(shared)  # (the head is tied to the embeddings)
    assert all(torch.equal(merged[n], base[n]) for n in shared)
    assert output.precision and output.precision["n_refreshes"] >= 2
