"""The Flower app of adamix-zoo: clients train AdaMix mixtures, the server aggregates the experts.

Modules: ``config`` (run settings, read once from ``[tool.flwr.app.config]`` / ``--run-config``),
``task`` (model, data partitions, local training and evaluation), ``records`` (tensors <->
``ArrayRecord``), ``strategies`` (validation of client updates around Flower's strategies),
``output`` (the run folder and publishing), ``client_app`` / ``server_app`` (the Flower components),
``runtime`` (starting SuperLink / SuperNodes and ``flwr run`` for ``adamix-zoo federate``).
"""
