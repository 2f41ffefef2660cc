"""The /metrics HTTP endpoint: a Prometheus registry served in text format on a daemon thread."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsEndpoint(NamedTuple):
    """A running /metrics server: `port` is the bound port, `stop()` shuts it down and joins."""

    port: int
    stop: Callable[[], None]


def start_http_server(port: int, host: str, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve `registry` in Prometheus text format on a daemon thread; port 0 picks a free port."""
    server_class = type(
        "_BoundServer", (_Server,), {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET}
    )
    httpd = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join()

    return MetricsEndpoint(httpd.server_address[1], stop)
