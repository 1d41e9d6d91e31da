"""docs/CONFIG.md is the typed config's own reference: regenerated, it is the same page, and
every field has a description (a new key without one fails here)."""

from __future__ import annotations

from pathlib import Path

from hfedmoe.foundation.reference import config_reference, undescribed

PAGE = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"


def test_every_config_key_has_a_description():
    assert undescribed() == []


def test_the_config_reference_is_current():
    assert PAGE.read_text() == config_reference(), (
        "docs/CONFIG.md is stale: .venv/bin/python -m hfedmoe.foundation.reference > docs/CONFIG.md"
    )


def test_the_reference_names_every_section_and_key():
    page = config_reference()
    for header in ("## [federation]", "## [privacy]", "## [[devices.tiers]]", "## [eval]"):
        assert header in page
    assert "| `client_test_fraction` |" in page and "| `max_client_share` |" in page
