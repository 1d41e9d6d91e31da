"""Flower apps that carry the algorithms, and the engines that run them.

- ``wire``: message keys and packing of algorithm objects into Flower records.
- ``strategy``: a Flower ``Strategy`` around any registered algorithm.
- ``server_app`` / ``client_app``: the ``ServerApp`` and ``ClientApp`` objects.
- ``inprocess``: the embedded engine (one process, no Ray) that runs those same apps.
"""
