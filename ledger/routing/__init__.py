"""The shard map: config file -> hash ring -> shard_for(merchant_id), with the config epoch."""
