"""Helpers the tests share: tiny configs and models, the real CLI (and crashes of it), failed
writes, device tiers, the model families, the budget calibration harness, a local Flower
deployment and the golden metrics."""
