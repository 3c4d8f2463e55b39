"""The service core: routes domain operations to shards and gathers per-item results."""
