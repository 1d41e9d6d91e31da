"""Helpers the tests share: tiny configs and models, the real CLI (and crashes of it), failed
writes, device tiers, the model families, the budget calibration harness, a local Flower
deployment, the golden metrics, a ClientApp that probes the worker pool and a time limit for
tests of what must not hang."""
