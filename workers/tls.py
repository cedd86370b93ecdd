"""Mutual TLS on the worker streams (the config's ``internal_tls``), for a multi-node cluster where
the router's streams to both pools cross the network.

One CA signs a certificate that every process presents (router and workers alike; the files sit
at the same paths on every node, e.g. one Kubernetes Secret mounted in every pod), and each side
checks the other's: a worker serves only a peer holding a certificate from that CA. Workers
advertise their node's IP, which no certificate can name in advance, so the router checks the
worker's certificate against ``server_name`` instead of the address.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from workers.wire import CHANNEL_OPTIONS


@dataclass(frozen=True)
class InternalTls:
    cert_file: str | None = None  # PEM certificate chain; all three files, or none (plain text)
    key_file: str | None = None
    ca_file: str | None = None  # the CA that signed every process's certificate
    server_name: str = "tandem-internal"  # a name (SAN) in the certificate

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """A worker server's credentials, which require a client certificate (None: plain text)."""
        if not self.enabled:
            return None
        key, cert, ca = self._files()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel(self, address: str) -> grpc.aio.Channel:
        """The router's channel to a worker at ``address``."""
        if not self.enabled:
            return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        key, cert, ca = self._files()
        credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        options = [*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", self.server_name)]
        return grpc.aio.secure_channel(address, credentials, options=options)

    def _files(self) -> tuple[bytes, bytes, bytes]:
        return tuple(Path(path).read_bytes() for path in (self.key_file, self.cert_file, self.ca_file))
