"""A checkout stays clean and its docs run anywhere: outputs git-ignored, one torch install command, no private
paths."""

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("output", ["u2a-demo/results.json", "runs/tiny/model.safetensors", "u2a-scores/x.parquet"])
def test_default_output_directories_are_git_ignored(output):
    if not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", output], cwd=ROOT)
    assert result.returncode == 0, f"{output} is not git-ignored"


def test_readme_and_quickstart_give_the_same_torch_install_command():
    commands = set()
    for path in ("README.md", "docs/quickstart.md"):
        with open(os.path.join(ROOT, path)) as f:
            commands |= {m.group(0).strip() for m in re.finditer(r"pip install torch[^&\n]*", f.read())}
    assert len(commands) == 1, commands


def test_docs_commands_hold_no_private_absolute_paths():
    found = []
    for path in [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if re.search(r"(?<![\w.])/(work|root|tmp|home)/", line):
                    found.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_import_is_quiet_and_the_controller_needs_no_trainer_library():
    """`import trl_u2a` and a U2AConfig print nothing a user cannot act on (bitsandbytes' kernels line, transformers'
    gradient_checkpointing rename), and the refresh controller, the influence engine and core/ import neither TRL nor
    transformers."""
    code = (
        "import sys\n"
        "import trl_u2a.refresh.controller, trl_u2a.influence, trl_u2a.core.weighting, trl_u2a.core.schedule\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('trl', 'transformers')], 'imported'\n"
        "import bitsandbytes\n"
        "from trl_u2a import U2AConfig\n"
        "U2AConfig(output_dir='out', use_cpu=True, bf16=False)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "gemm_4bit_forward" not in result.stderr and "gradient_checkpointing" not in result.stderr, result.stderr
    assert "publisher trust check" not in result.stderr, result.stderr  # kernels, under HF_HUB_OFFLINE=1
