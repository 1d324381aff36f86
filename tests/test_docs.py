"""The documentation builds without a single warning and matches the code it documents."""

import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _u2a_fields() -> list[str]:
    """Fields declared in `U2AConfig` itself (its own options and the TRL defaults it overrides)."""
    from trl_u2a.config import U2AConfig

    own = inspect.get_annotations(U2AConfig)
    return [f.name for f in dataclasses.fields(U2AConfig) if f.name in own]


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (it is in the `dev` and `test` extras)")
    pytest.importorskip(
        "mkdocstrings_handlers.python",
        reason="mkdocstrings-python is not installed (it is in the `dev` and `test` extras)",
    )
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    api = (site / "api" / "index.html").read_text()
    for name in (
        "config.U2AConfig",
        "trainer.U2ATrainer",
        "refresh.callback.U2ARefreshCallback",
        "refresh.controller.RefreshController",
        "refresh.host.RefreshHost",
        "scoring.score_negatives",
        "influence.query.compute_query",
        "influence.scores.score_dataset",
        "core.weighting.refresh_weights",
    ):
        assert f'id="trl_u2a.{name}"' in api, f"trl_u2a.{name} is missing from the API reference"


def test_every_config_field_is_documented():
    from trl_u2a.config import U2AConfig

    # The user docs, not the docstring: a field named only in U2AConfig's own docstring is not documented for users
    text = "\n".join([(DOCS / "usage.md").read_text(), (DOCS / "method.md").read_text()])
    missing = [name for name in _u2a_fields() if not re.search(rf"`{re.escape(name)}\b", text)]
    assert not missing, f"U2AConfig fields named (as code) neither in docs/usage.md nor docs/method.md: {missing}"
    from trl import KTOConfig

    own = [name for name in _u2a_fields() if name not in KTOConfig.__dataclass_fields__]  # not the TRL overrides
    undocumented = [name for name in own if not re.search(rf"^\s+{name} \(`", U2AConfig.__doc__, re.M)]
    assert not undocumented, f"U2AConfig fields missing from its docstring's Parameters: {undocumented}"


def test_documented_knobs_exist():
    """Every option named in the first column of the knob table of docs/usage.md is a real `U2AConfig` field."""
    from trl_u2a.config import U2AConfig

    fields = {f.name for f in dataclasses.fields(U2AConfig)}
    usage = (DOCS / "usage.md").read_text()
    table = usage.split("## Choosing the knobs", 1)[1].split("\n## ", 1)[0]
    named = [
        name
        for line in table.splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([a-z_]+)`", line.split("|")[1])
    ]
    assert len(named) >= 10, "the knob table of docs/usage.md was not found"
    unknown = sorted(set(named) - fields)
    assert not unknown, f"docs/usage.md documents options that U2AConfig does not have: {unknown}"


def _code_default(field) -> str:
    value = field.default
    return "None" if value is None else str(value)


def _same_default(doc: str, code: str) -> bool:
    doc = doc.strip().strip('"').strip("'")
    try:
        return float(doc) == float(code)
    except ValueError:
        return doc == code


def test_the_knob_table_states_the_code_defaults():
    """Every default in the knob table of docs/usage.md equals `U2AConfig`'s (a stale doc default is a bug)."""
    from trl_u2a.config import U2AConfig

    fields = {f.name: f for f in dataclasses.fields(U2AConfig)}
    usage = (DOCS / "usage.md").read_text()
    table = usage.split("## Choosing the knobs", 1)[1].split("\n## ", 1)[0]
    checked = 0
    for line in table.splitlines():
        cells = line.split("|")
        if not line.startswith("| `") or len(cells) < 4:
            continue
        names = re.findall(r"`([a-z_]+)`", cells[1])
        values = re.findall(r"`([^`]+)`", cells[2])
        if len(values) != len(names):  # e.g. "per-device train batch": described, not a literal
            continue
        for name, value in zip(names, values):
            assert _same_default(value, _code_default(fields[name])), (
                f"docs/usage.md gives {name} the default {value!r}; U2AConfig has {fields[name].default!r}"
            )
            checked += 1
    assert checked >= 15


def test_the_config_docstring_states_the_code_defaults():
    from trl_u2a.config import U2AConfig

    fields = {f.name: f for f in dataclasses.fields(U2AConfig)}
    stated = re.findall(r"^\s+(\w+) \(`[^`]+`, \*optional\*, defaults to `([^`]+)`\)", U2AConfig.__doc__, re.M)
    assert len(stated) >= 15
    for name, value in stated:
        assert _same_default(value, _code_default(fields[name])), (name, value, fields[name].default)
