"""Engines that run the Flower apps of ``hfedmoe.federation`` unchanged.

- ``embedded``: one process, no Ray (``hfedmoe run``): a Flower ``Grid`` that hands each message
  to the ClientApp of its destination node;
- ``flower``: Flower's own engines through ``flwr run``: the Ray simulation or a deployment
  (SuperLink and SuperNodes; ``hfedmoe flower``).
"""
