"""The gRPC API layer: decode and validate requests, map results and errors to statuses."""
