"""`trtserve` command line: `serve` runs the server, `build` warms the engine plan cache.

Every flag can also be set as an environment variable `TRTSERVE_<FLAG>` (upper case, dashes as
underscores), which is how the Kubernetes manifests configure it; a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from service.settings import ServerSettings

_DEFAULTS = ServerSettings(model_repository=Path("models"))


def _env(flag: str, default: object) -> object:
    return os.environ.get("TRTSERVE_" + flag.upper().replace("-", "_"), default)


def _add(parser: argparse.ArgumentParser, flag: str, help: str, **kwargs: object) -> None:
    default = kwargs.pop("default", None)
    env_value = _env(flag, None)
    if env_value is not None:
        default = env_value.split() if kwargs.get("nargs") else env_value
    parser.add_argument(f"--{flag}", default=default, help=f"{help} [env TRTSERVE_{flag.upper().replace('-', '_')}]",
                        **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trtserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model repository over gRPC (KServe v2 / Triton protocol)")
    _add(serve, "model-repository", "path of the model repository", required=_env("model-repository", None) is None)
    _add(serve, "host", "address to bind (gRPC and metrics)", default=_DEFAULTS.host)
    _add(serve, "grpc-port", "gRPC port; 0 picks a free port and logs it", type=int, default=_DEFAULTS.grpc_port)
    _add(serve, "metrics-port", "Prometheus /metrics HTTP port; 0 picks a free port, -1 disables", type=int,
         default=_DEFAULTS.metrics_port)
    _add(serve, "model-control-mode", "none: load every model at start; explicit: load with RepositoryModelLoad",
         choices=["none", "explicit"], default=_DEFAULTS.model_control_mode)
    _add(serve, "load-model", "with explicit mode, models to load at start (repeatable)", nargs="+",
         action="extend", default=[])
    _add(serve, "engine-cache-dir", "directory of the on-disk engine plan cache", default=None)
    _add(serve, "shutdown-grace-seconds", "on SIGTERM, how long in-flight requests may take to finish",
         type=float, default=_DEFAULTS.shutdown_grace_seconds)
    _add(serve, "worker-start-timeout-seconds", "how long a model's worker may take to load and warm up",
         type=float, default=_DEFAULTS.worker_start_timeout_seconds)
    _add(serve, "shm-bytes-per-model", "shared memory for requests in flight to one model", type=int,
         default=_DEFAULTS.shm_bytes_per_model)
    _add(serve, "max-request-bytes", "largest gRPC message accepted", type=int, default=_DEFAULTS.max_request_bytes)
    _add(serve, "intra-op-threads", "ONNX Runtime threads per model on the CPU (0 = the CPUs the server may use where "
         "its CPU affinity or cgroup limit restricts them, else ONNX Runtime's default of one per core)", type=int,
         default=_DEFAULTS.intra_op_threads)
    _add(serve, "intra-op-spinning", "let ONNX Runtime's CPU threads busy-wait for work between runs: a little "
         "lower latency on cores of their own, CPU taken from the frontend and other models on shared ones",
         type=_on_off, default=_DEFAULTS.intra_op_spinning)
    _add(serve, "max-inflight-per-model", "requests one model may hold at once; beyond it new ones get "
         "RESOURCE_EXHAUSTED at once", type=int, default=_DEFAULTS.max_inflight_per_model)
    _add(serve, "worker-hang-timeout-seconds", "a worker that answers no heartbeat for this long (it answers "
         "between batches) is killed and respawned", type=float, default=_DEFAULTS.worker_hang_timeout_seconds)
    _add(serve, "tls-cert", "PEM certificate chain: serve gRPC over TLS (with --tls-key)", default=None)
    _add(serve, "tls-key", "PEM private key of --tls-cert", default=None)
    _add(serve, "tls-client-ca", "PEM CA bundle: require client certificates signed by it (mutual TLS)",
         default=None)
    _add(serve, "log-level", "debug, info, warning or error", default=_DEFAULTS.log_level)
    _add(serve, "engine-mode", "default engine_policy.mode: REUSE keeps one engine per model, MULTI one per "
         "bucket (TRTSERVE_MULTI_ENGINE=1 also selects MULTI)", type=str.upper, choices=["REUSE", "MULTI"],
         default="MULTI" if os.environ.get("TRTSERVE_MULTI_ENGINE") == "1" else _DEFAULTS.engine_mode)
    _add(serve, "engine-bucket", "default engine_policy.bucket: capacity of a new engine (POW2 or EXACT)",
         type=str.upper, choices=["POW2", "EXACT"], default=_DEFAULTS.engine_bucket)
    _add(serve, "engine-rebuild", "default engine_policy.rebuild: BACKGROUND serves an oversize batch in chunks "
         "while the larger engine builds; BLOCKING waits for it", type=str.upper,
         choices=["BACKGROUND", "BLOCKING"], default=_DEFAULTS.engine_rebuild)

    _add(serve, "frontend-processes", "gRPC frontend processes sharing the port: one Python process parses "
         "about 3,500 small requests/s; with N > 1 the kernel spreads client connections over N processes, "
         "each talking to the workers directly (give each a core; every one maps its own shared memory per "
         "model)", type=_positive, default=_DEFAULTS.frontend_processes)
    _add(serve, "heap-keep-bytes", "freed heap memory each frontend process keeps for the next requests "
         "instead of returning it to the kernel (glibc malloc's trim threshold; allocations up to half of it, "
         "at most 32 MiB, come from the heap): large requests reuse warm pages instead of faulting in fresh "
         "ones; 0 keeps glibc's defaults", type=_heap_bytes, default=_DEFAULTS.heap_keep_bytes)

    build = sub.add_parser("build", help="build engine plans into the cache ahead of time (init containers)")
    _add(build, "model-repository", "path of the model repository", required=_env("model-repository", None) is None)
    _add(build, "engine-cache-dir", "directory of the on-disk engine plan cache",
         required=_env("engine-cache-dir", None) is None)
    _add(build, "model", "models to build (repeatable; default: every model)", nargs="+", action="extend",
         default=[])
    _add(build, "batch-sizes", "comma-separated capacities, e.g. 1,8,64 (default: the model's warm-up sizes, "
         "else every bucket up to max_batch_size)", default="")
    return parser


def _on_off(value: str | bool) -> bool:
    """A switch given as on/off, true/false, yes/no or 1/0 (flags and environment variables alike)."""
    text = str(value).strip().lower()
    if text in ("1", "on", "true", "yes"):
        return True
    if text in ("0", "off", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def _positive(value: str | int) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value!r}")
    return number


def _heap_bytes(value: str | int) -> int:
    number = int(value)
    if not 0 <= number < 1 << 31:  # glibc's mallopt takes an int
        raise argparse.ArgumentTypeError(f"expected 0 to {(1 << 31) - 1} bytes, got {value!r}")
    return number


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Turn parsed `serve` arguments into the settings object passed down the server."""
    return ServerSettings(
        model_repository=Path(args.model_repository),
        host=args.host,
        grpc_port=int(args.grpc_port),
        metrics_port=int(args.metrics_port),
        model_control_mode=args.model_control_mode,
        load_models=tuple(args.load_model or ()),
        engine_cache_dir=_path(args.engine_cache_dir),
        shutdown_grace_seconds=float(args.shutdown_grace_seconds),
        worker_start_timeout_seconds=float(args.worker_start_timeout_seconds),
        shm_bytes_per_model=int(args.shm_bytes_per_model),
        max_request_bytes=int(args.max_request_bytes),
        intra_op_threads=int(args.intra_op_threads),
        intra_op_spinning=bool(args.intra_op_spinning),  # argparse applied _on_off
        max_inflight_per_model=int(args.max_inflight_per_model),
        worker_hang_timeout_seconds=float(args.worker_hang_timeout_seconds),
        tls_cert=_path(args.tls_cert),
        tls_key=_path(args.tls_key),
        tls_client_ca=_path(args.tls_client_ca),
        log_level=str(args.log_level),
        engine_mode=args.engine_mode,
        engine_bucket=args.engine_bucket,
        engine_rebuild=args.engine_rebuild,
        frontend_processes=int(args.frontend_processes),
        heap_keep_bytes=int(args.heap_keep_bytes),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        if bool(args.tls_cert) != bool(args.tls_key) or (args.tls_client_ca and not args.tls_cert):
            parser.error("--tls-cert and --tls-key go together, and --tls-client-ca needs them")
        from service.frontend.app import serve

        return serve(settings_from_args(args))
    from service.engines.prebuild import build_plans

    sizes = [int(s) for s in str(args.batch_sizes).split(",") if s.strip()]
    return build_plans(Path(args.model_repository), Path(args.engine_cache_dir), args.model, sizes)


if __name__ == "__main__":
    sys.exit(main())
