"""A seeded chaos workload for the ledger (as Jepsen's bank test): `python -m chaos.run`.

Three shards (one PostgreSQL server each) behind TCP proxies that the runner
controls, two service replicas as real processes, several clients sending
transfers over gRPC while faults are injected on a schedule drawn from the
seed; afterwards everything is healed and a checker proves the books. See
chaos/README.md.
"""
