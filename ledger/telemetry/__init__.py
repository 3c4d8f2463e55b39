"""Tracing, metrics and logs. Imported by every layer; depends on none of them."""
