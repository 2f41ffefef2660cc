"""Binding the public gRPC port the same way in every frontend process (TLS, message limits)."""

from __future__ import annotations

import grpc

from service.settings import ServerSettings


def grpc_options(settings: ServerSettings) -> list[tuple[str, int]]:
    """Server and channel options every frontend process uses: the largest message accepted."""
    return [("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", settings.max_request_bytes)]


def bind_public_port(server: grpc.aio.Server, settings: ServerSettings, port: int) -> int:
    """Bind `settings.host:port` (TLS when configured); the bound port. gRPC sets SO_REUSEPORT, so every
    frontend process binds the same port and the kernel spreads new connections over them."""
    address = f"{_bracket(settings.host)}:{port}"
    if settings.tls_cert:
        bound = server.add_secure_port(address, _tls_credentials(settings))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind gRPC port {settings.host}:{port}")
    return bound


def _tls_credentials(settings: ServerSettings) -> grpc.ServerCredentials:
    """TLS for the gRPC port; with a client CA, clients must present a certificate it signed."""
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
