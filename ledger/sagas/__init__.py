"""Workflows across shards: the cross-shard transfer saga, its recovery worker, reconcile."""
