"""Server settings: parsed once in `main()` from flags and TRTSERVE_* environment variables, then passed down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerSettings:
    """Everything `trtserve serve` is configured with (see `trtserve serve --help`)."""

    model_repository: Path
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_control_mode: str = "none"  # none: load every model at start; explicit: RepositoryModelLoad/Unload
    load_models: tuple[str, ...] = ()
    engine_cache_dir: Path | None = None
    shutdown_grace_seconds: float = 30.0
    worker_start_timeout_seconds: float = 300.0
    shm_bytes_per_model: int = 64 << 20
    max_request_bytes: int = 64 << 20
    intra_op_threads: int = 0
    intra_op_spinning: bool = False  # ONNX Runtime CPU threads busy-wait between runs
    max_inflight_per_model: int = 1024
    worker_hang_timeout_seconds: float = 120.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate signed by it (mutual TLS)
    log_level: str = "info"
    engine_mode: str = "REUSE"  # server default for engine_policy.mode; TRTSERVE_MULTI_ENGINE=1 -> MULTI
    engine_bucket: str = "POW2"
    engine_rebuild: str = "BACKGROUND"
    frontend_processes: int = 1  # gRPC frontend processes sharing the port (SO_REUSEPORT)
    heap_keep_bytes: int = 64 << 20  # freed heap a frontend process keeps for the next requests (glibc)
