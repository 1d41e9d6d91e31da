"""hfedmoe: federated fine-tuning of Mixture-of-Experts models under heterogeneous budgets.

Layers, each depending only on the ones above it:

- ``hfedmoe.config``, ``hfedmoe.errors``: typed configuration and user-facing errors.
- ``hfedmoe.model``: the MoE models (sparse upcycling of shipped dense models) and checkpoints.
- ``hfedmoe.data``: data sets and their non-IID partitions.
- ``hfedmoe.algorithms``: the federated algorithms as plain torch code (no engine imports).
- ``hfedmoe.engine``: Flower ServerApp / ClientApp / Strategy that carry the algorithms,
  plus the embedded in-process engine.
- ``hfedmoe.cli``: the ``hfedmoe`` command.
"""

__version__ = "0.1.0"
