"""hfedmoe: federated fine-tuning of Mixture-of-Experts models under heterogeneous budgets.

Layers, each importing only the ones below it (checked by ``make lint``, import-linter):

- ``hfedmoe.cli``: the ``hfedmoe`` command;
- ``hfedmoe.experiment``: the comparison grid and the report, over many runs;
- ``hfedmoe.engines``: what runs the Flower apps: the embedded engine, or ``flwr run``;
- ``hfedmoe.federation``: the Flower ServerApp, ClientApp, Strategy and wire format;
- ``hfedmoe.algorithms``: the federated algorithms as plain torch code (no engine imports), and
  ``hfedmoe.results``: the run directory a ServerApp writes (metrics, checkpoint, model);
- ``hfedmoe.budget``: device tiers and the cost model that gives each client its C_budget;
- ``hfedmoe.training``: the one local training loop, its optimizer, evaluation, memory probe;
- ``hfedmoe.data``: data sets, splits, partitions and tokenised batches;
- ``hfedmoe.model``: the MoE models, the expert interface and checkpoints;
- ``hfedmoe.foundation``: typed configuration, errors, seeding and shipped assets.
"""

__version__ = "0.1.0"
