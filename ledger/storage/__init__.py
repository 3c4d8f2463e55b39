"""One Shard per PostgreSQL server: pool, migrations and set-based SQL."""
