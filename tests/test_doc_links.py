"""Messages point to the documentation site, not to `docs/*.md` paths (which an installed wheel does not ship), and
every page and heading they name exists."""

import ast
import re
import unicodedata
from pathlib import Path

import pytest
import yaml

from trl_u2a.doc_links import DOCS_URL, docs_page

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "trl_u2a").rglob("*.py"))


def _docstrings(tree):
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, nodes) and node.body and isinstance(node.body[0], ast.Expr)
    }


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug, which mkdocs uses for heading ids."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_message_names_a_docs_path(path):
    tree = ast.parse(path.read_text())
    docstrings = _docstrings(tree)
    found = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and re.search(r"docs/[\w-]+\.md", node.value)
    ]
    assert not found, f"{path.name}: use doc_links.docs_page instead of {found}"


def test_every_linked_page_and_heading_exists():
    linked = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "docs_page":
                linked.append((path.name, *[a.value for a in node.args]))
    assert len(linked) >= 6
    for where, page, *anchor in linked:
        page_file = ROOT / "docs" / f"{page}.md"
        assert page_file.is_file(), (where, page)
        if anchor:
            headings = {_slug(line.lstrip("#").strip()) for line in page_file.read_text().splitlines()
                        if line.startswith("#")}  # fmt: skip
            assert anchor[0] in headings, (where, page, anchor[0])


def test_the_links_use_the_site_url_of_mkdocs():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["site_url"].rstrip("/") == DOCS_URL
    assert docs_page("usage", "data") == f"{DOCS_URL}/usage/#data"
