"""Links from messages to the documentation site: an installed wheel ships no `docs/` folder, so a message that named
`docs/usage.md` pointed nowhere."""

from __future__ import annotations

# mkdocs.yml's `site_url` (a test keeps them equal)
DOCS_URL = "https://trl-u2a.readthedocs.io/en/latest"


def docs_page(page: str, anchor: str | None = None) -> str:
    """The address of the documentation page `page` (its `docs/` file name without `.md`), at the heading whose
    slug is `anchor` (mkdocs' heading ids: lower case, words joined by `-`)."""
    url = f"{DOCS_URL}/{page}/"
    return f"{url}#{anchor}" if anchor else url
