"""Online rebalancing: moving merchants between shards when the shard config changes."""
