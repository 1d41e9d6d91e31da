"""Mechanics the budget-aware algorithms share, one job a module (see ``assignment``)."""
