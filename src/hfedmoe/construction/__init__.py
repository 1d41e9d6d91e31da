"""Specialised MoE models built from a dense parent (``model.construction``), cached by recipe."""

from hfedmoe.construction.prepare import ensure_prepared, prepared_dir, recipe

__all__ = ["ensure_prepared", "prepared_dir", "recipe"]
