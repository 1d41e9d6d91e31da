"""docs/METHOD.md holds every equation the code cites: a reader of ``eq. (17)`` in the source
can look it up in the repository (HFedMoE's numbers, and FLUX's by "FLUX's eq.")."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHOD = (REPO / "docs" / "METHOD.md").read_text()

#: "eq. (17)", "eqs. (19)-(21)", "eq. 15", optionally "FLUX's " before it
CITATION = re.compile(r"(FLUX's )?eqs?\. \(?(\d+)\)?(?:-\(?(\d+)\)?)?")


def citations() -> set[tuple[str, int]]:
    """(paper, equation) of every citation in src/: HFedMoE's, or FLUX's."""
    found = set()
    for path in (REPO / "src").rglob("*.py"):
        for match in CITATION.finditer(path.read_text()):
            paper = "flux" if match.group(1) else "hfedmoe"
            first = int(match.group(2))
            last = int(match.group(3) or first)
            found |= {(paper, n) for n in range(first, last + 1)}
    return found


def test_the_code_cites_equations():
    cited = citations()
    assert ("hfedmoe", 17) in cited and ("flux", 3) in cited  # the scan finds them


def test_every_equation_the_code_cites_is_in_method_md():
    flux = METHOD[METHOD.index("## 9a. FLUX") : METHOD.index("## 9b.")]
    missing = []
    for paper, n in sorted(citations()):
        if paper == "hfedmoe" and f"({n})" not in METHOD:
            missing.append(f"eq. ({n})")
        if paper == "flux" and not re.search(rf"FLUX's eq\. \(?{n}\)?", flux):
            missing.append(f"FLUX's eq. ({n})")
    assert not missing, f"cited in src/ but not in docs/METHOD.md: {', '.join(missing)}"
