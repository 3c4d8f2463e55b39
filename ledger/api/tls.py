"""TLS for the gRPC server from PEM files; mutual TLS when a client CA is given."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ServerTls:
    cert_file: Path
    key_file: Path
    # With a client CA, every client must present a certificate it signed (mTLS).
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        # Read at start-up: a missing or unreadable file stops the server before it listens.
        key = self.key_file.read_bytes()
        cert = self.cert_file.read_bytes()
        client_ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, cert)],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
