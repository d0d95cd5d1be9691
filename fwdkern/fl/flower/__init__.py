"""Flower runner for the seed-and-scalar protocol (Flower >= 1.41 Message API).

``codec`` (records <-> protocol messages), ``run_config`` (settings from
``context.run_config``), ``client_app`` (one SuperNode = one simulated client, chosen by its
``partition-id``) and ``server_app`` (the embedded runner with Flower as the transport).

Run it (one machine; Flower 1.41 reads SuperLink connections from
``$FLWR_HOME/config.toml``, default ``~/.flwr/config.toml``)::

    flower-superlink --insecure --port 9093 --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9101 --node-config "partition-id=0"
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9102 --node-config "partition-id=1"
    flwr run examples/flower fwdkern-local --stream --run-config "clients=2 clients-per-round=2 rounds=10"

There must be exactly one SuperNode per client, partition ids 0 .. clients-1, and ``fwdkern``
must be importable by the SuperLink's and SuperNodes' Python (``pip install .``).
"""
from .client_app import client_app, handle_query, handle_train  # noqa: F401
from .codec import (plan_from_record, plan_to_record, sync_from_record, sync_to_record,  # noqa: F401
                    update_from_content, update_to_content)
from .run_config import FLOWER_DEFAULTS, parse_run_config  # noqa: F401
from .server_app import FlowerExchange, discover_partitions, run_server, server_app  # noqa: F401

__all__ = ["client_app", "server_app", "FlowerExchange", "parse_run_config", "discover_partitions",
           "handle_train", "handle_query", "plan_to_record", "plan_from_record", "sync_to_record",
           "sync_from_record", "update_to_content", "update_from_content", "run_server", "FLOWER_DEFAULTS"]
