"""Every link between the project's pages leads somewhere: a relative link names a file of the
repository, and a ``#fragment`` names a heading of the page it points into (GitHub's anchors).
A page renamed, or a heading reworded, fails here instead of on a reader."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {github_anchor(h) for h in re.findall(r"^#+\s+(.*)$", text, re.M)}


def test_github_anchor_matches_githubs_rule() -> None:
    assert github_anchor("Hostile clients") == "hostile-clients"
    assert github_anchor("Secure aggregation: not wired, and why") == (
        "secure-aggregation-not-wired-and-why"
    )
    assert github_anchor("1. Install and run the default job") == (
        "1-install-and-run-the-default-job"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path) if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading '#{fragment}' in {linked.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)
