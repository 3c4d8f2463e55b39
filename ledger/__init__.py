"""The sharded double-entry ledger service (docs/architecture.md).

Importing the package chooses gRPC's I/O engine for the service's listener before
anything imports grpc (ledger/grpc_engine.py)."""

from ledger.grpc_engine import choose_listener_engine

choose_listener_engine()
