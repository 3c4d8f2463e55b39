"""The ledger benchmark: the service over gRPC against raw PostgreSQL, in one run.

Run it as `python -m bench.run`; bench/README.md says what it measures.
"""
