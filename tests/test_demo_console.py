"""The default `trl-u2a demo` (one seed) on a terminal: one note that one seed gives no verdict, point estimates in
tables no wider than 100 columns, and a pointer to --full."""

import pytest

pytest.importorskip("matplotlib")

from test_demo import demo_results

from trl_u2a import demo
from trl_u2a.demo import DemoConfig
from trl_u2a.demo.report import CONSOLE_WIDTH


def _run(seed, setting, lr, loss, method, harm, ppl):
    trajectory = [
        {"step": 0, "harmful_rate": 0.45, "retain_ppl": 2.8, "degenerate_rate": 0.0},
        {"step": 30, "harmful_rate": harm, "retain_ppl": ppl, "degenerate_rate": 0.02},
    ]
    return {
        "seed": seed, "setting": setting, "lr": lr, "loss": loss, "method": method, "harmful_rate": harm,
        "harm_prob": harm + 0.01, "retain_ppl": ppl, "J": 0.5 - harm / 10, "pref_acc": 0.6, "degenerate_rate": 0.02,
        "collapsed": False, "trajectory": trajectory, "sel_harmful_first": 0.7, "sel_harmful_last": 0.9,
    }  # fmt: skip


def one_seed_results(config):
    methods = {"uniform": 0.30, "random": 0.33, "oracle": 0.22, "u2a": 0.27, "u2a-select": 0.28, "u2a-fisher": 0.29}
    runs = [_run(0, "-", None, "-", "start", 0.45, 2.8)]
    for setting, lr in (("full", 1e-4), ("lora", 3e-4)):
        for loss in ("ga", "npo", "simnpo"):
            runs += [_run(0, setting, lr, loss, m, h, 2.9) for m, h in methods.items()]
        runs.append(_run(0, setting, lr, "dpo", "dpo", 0.2, 2.7))
    timing = {"total": 300.0, "start_models": 22.0, "training": 200.0, "evaluation": 78.0}
    return demo_results(runs, config, timing, ["harm_vs_ppl.png", "trajectories.png", "refreshes.png"])


def test_one_seed_output_fits_a_terminal_says_once_why_there_is_no_verdict(monkeypatch, capsys):
    from trl_u2a.scripts import demo as script

    monkeypatch.setattr(demo, "run_demo", one_seed_results)
    assert script.cli(["--no_progress"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= CONSOLE_WIDTH, max(lines, key=len)
    assert out.count("no interval and no verdict") == 1 and "trl-u2a demo --full" in out
    # No interval or verdict that one seed cannot give, no recovered share of +200 %
    assert "∞" not in out and "inconclusive" not in out and "holds" not in out and "%" not in out
    # Point estimates: u2a's harmful rate and its difference from uniform's, in the npo row of full fine-tuning
    full = out[out.index("Full fine-tuning, lr 0.0001:") : out.index("LoRA adapter")]
    row = next(line.split() for line in full.splitlines() if line.split()[:2] == ["npo", "u2a"])
    assert row[2:4] == ["0.27", "-0.03"]
    assert "Start model: harmful 0.45" in out and "u2a-demo/results.json" in out


def test_the_note_names_the_seeds_and_each_table_its_setting():
    # Six seeds or more keep the intervals and verdicts: test_demo.test_cli_maps_arguments_to_the_config
    from trl_u2a.demo.report import format_points, one_seed_note

    results = one_seed_results(DemoConfig.reduced())
    assert one_seed_note([0]).startswith("1 seed (seed 0):") and "2 seeds (seeds 0, 1)" in one_seed_note([0, 1])
    table = format_points(results["summary"])
    assert "LoRA adapter (r 8, alpha 16, every linear layer), lr 0.0003:" in table
