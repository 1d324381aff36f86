"""No function in trl_u2a/ runs over 80 lines of code (its docstring aside): a longer one is split into named steps."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80


@pytest.mark.parametrize("path", sorted((ROOT / "trl_u2a").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_are_at_most_80_lines_of_code(path):
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
            lines = node.end_lineno - body[0].lineno + 1
            if lines > MAX_LINES:
                long.append(f"{node.name} ({lines} lines)")
    assert not long, f"{path.name}: {long}"
