"""The Flower apps that carry the algorithms, the same on every engine.

- ``wire``: message keys and the packing of algorithm objects into Flower records;
- ``strategy``: a Flower ``Strategy`` around any registered algorithm (sampling, validation);
- ``server_app`` / ``client_app``: the ``ServerApp`` and ``ClientApp`` objects (thin: they
  unpack messages, call the algorithm and pack replies);
- ``workload``: the model and data each party builds from the config;
- ``faults``: injected client faults (tests and experiments), consulted by the ClientApp only;
- ``preflight``: the checks of an experiment before anything is written.
"""
