"""docs/config.md is the generated reference of gateway/config.py (the one source of defaults)."""

from __future__ import annotations

from pathlib import Path

from gateway.configdoc import reference


def test_the_config_reference_in_docs_is_generated_from_config_py():
    docs = Path(__file__).resolve().parent.parent / "docs" / "config.md"
    assert docs.read_text() == reference(), "run: python -m gateway.configdoc > docs/config.md"
