"""The core install works without its extras: `[demo]` (matplotlib, alt-profanity-check), `[qlora]` (bitsandbytes)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trl_u2a import plots
from trl_u2a.scripts import demo as demo_script

ROOT = Path(__file__).resolve().parents[1]
EXTRA_DISTRIBUTIONS = {"demo": {"matplotlib", "alt-profanity-check"}, "qlora": {"bitsandbytes"}}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def test_extras_hold_the_optional_packages_and_test_pulls_them_all():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    for extra, names in EXTRA_DISTRIBUTIONS.items():
        assert names <= {_name(r) for r in extras[extra]}, extra
        assert not names & core, f"{names & core} must not be core dependencies"
    # CI installs `.[test]`: it must bring every extra, through the package itself
    assert any(r.replace(" ", "") in ("trl-u2a[demo,qlora]", "trl-u2a[qlora,demo]") for r in extras["test"])


def test_refresh_plots_are_skipped_with_one_warning_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setattr(plots, "matplotlib", None)
    history = [{"refresh": 0, "step": 0, "objective": 0.69, "weights": [1.0, 0.0]}]
    with pytest.warns(UserWarning, match=r"matplotlib is not installed.*pip install matplotlib") as record:
        assert plots.plot_refreshes(history, str(tmp_path / "plots")) == []
    assert len(record) == 1 and not (tmp_path / "plots").exists()


def test_demo_without_its_extra_fails_at_once_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(demo_script.DEMO_MODULES, "no_such_module_u2a", "no-such-distribution")
    assert demo_script.cli(["--quick"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-distribution" in err and 'pip install -e ".[demo]"' in err


@pytest.mark.slow
def test_core_trains_plots_and_scores_with_the_extras_blocked(tiny_model_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    script = ROOT / "tests" / "scripts" / "without_extras.py"
    run = subprocess.run(
        [sys.executable, str(script), tiny_model_path, str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["imported"] == []  # none of the blocked packages (or a submodule) got imported
    assert result["refreshes"] >= 2 and len(result["scores"]) == 6
    assert all(isinstance(s, float) for s in result["scores"])
    # The end-of-training plots: skipped with one warning naming what to install, nothing written
    assert len(result["plot_warnings"]) == 1 and "pip install matplotlib" in result["plot_warnings"][0]
    assert not result["plots_dir"]
    # `trl-u2a demo`: refused at once, in one line naming the extra, before writing anything
    assert result["demo_rc"] == 1 and not result["demo_output"]
    assert result["demo_stderr"].count("\n") == 1 and 'pip install -e ".[demo]"' in result["demo_stderr"]
    assert "matplotlib, alt-profanity-check" in result["demo_stderr"]
