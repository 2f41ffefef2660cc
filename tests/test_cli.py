"""Flags and TRTSERVE_* environment variables parse into the same settings; flags win."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import build_parser, settings_from_args


def _settings(argv, monkeypatch, env=None):
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    return settings_from_args(build_parser().parse_args(argv))


def test_defaults(monkeypatch):
    s = _settings(["serve", "--model-repository", "repo"], monkeypatch)
    assert (s.model_repository, s.host, s.grpc_port, s.metrics_port) == (Path("repo"), "0.0.0.0", 8001, 8002)
    assert s.model_control_mode == "none" and s.load_models == () and s.engine_cache_dir is None
    assert s.intra_op_spinning is False


@pytest.mark.parametrize(("value", "expected"), [("off", False), ("0", False), ("No", False), ("on", True),
                                                 ("true", True), ("1", True)])
def test_on_off_switch(monkeypatch, value, expected):
    argv = ["serve", "--model-repository", "r", "--intra-op-spinning", value]
    assert _settings(argv, monkeypatch).intra_op_spinning is expected


def test_bad_switch_is_refused(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _settings(["serve", "--model-repository", "r", "--intra-op-spinning", "sometimes"], monkeypatch)
    assert "expected on or off, got 'sometimes'" in capsys.readouterr().err


def test_every_flag_has_an_environment_variable(monkeypatch):
    env = {
        "TRTSERVE_MODEL_REPOSITORY": "/models", "TRTSERVE_HOST": "127.0.0.1", "TRTSERVE_GRPC_PORT": "9001",
        "TRTSERVE_METRICS_PORT": "9002", "TRTSERVE_MODEL_CONTROL_MODE": "explicit",
        "TRTSERVE_LOAD_MODEL": "tiny mlp", "TRTSERVE_ENGINE_CACHE_DIR": "/cache",
        "TRTSERVE_SHUTDOWN_GRACE_SECONDS": "5", "TRTSERVE_WORKER_START_TIMEOUT_SECONDS": "7",
        "TRTSERVE_SHM_BYTES_PER_MODEL": "1048576", "TRTSERVE_MAX_REQUEST_BYTES": "2048",
        "TRTSERVE_INTRA_OP_THREADS": "2", "TRTSERVE_INTRA_OP_SPINNING": "on", "TRTSERVE_LOG_LEVEL": "debug",
        "TRTSERVE_ENGINE_MODE": "multi",
        "TRTSERVE_ENGINE_BUCKET": "EXACT", "TRTSERVE_ENGINE_REBUILD": "BLOCKING",
        "TRTSERVE_MAX_INFLIGHT_PER_MODEL": "9", "TRTSERVE_WORKER_HANG_TIMEOUT_SECONDS": "11",
        "TRTSERVE_TLS_CERT": "/c.pem", "TRTSERVE_TLS_KEY": "/k.pem", "TRTSERVE_TLS_CLIENT_CA": "/ca.pem",
        "TRTSERVE_FRONTEND_PROCESSES": "4", "TRTSERVE_HEAP_KEEP_BYTES": "0",
    }
    s = _settings(["serve"], monkeypatch, env)
    assert s.model_repository == Path("/models") and s.host == "127.0.0.1"
    assert (s.grpc_port, s.metrics_port, s.model_control_mode) == (9001, 9002, "explicit")
    assert s.load_models == ("tiny", "mlp") and s.engine_cache_dir == Path("/cache")
    assert (s.shutdown_grace_seconds, s.worker_start_timeout_seconds) == (5.0, 7.0)
    assert (s.shm_bytes_per_model, s.max_request_bytes, s.intra_op_threads, s.log_level) == (1048576, 2048, 2, "debug")
    assert (s.engine_mode, s.engine_bucket, s.engine_rebuild) == ("MULTI", "EXACT", "BLOCKING")
    assert s.intra_op_spinning is True
    assert (s.max_inflight_per_model, s.worker_hang_timeout_seconds) == (9, 11.0)
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (Path("/c.pem"), Path("/k.pem"), Path("/ca.pem"))
    assert s.frontend_processes == 4 and s.heap_keep_bytes == 0
    # every serve flag is covered above
    flags = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["serve"]._actions} - {"help"}
    assert {f"TRTSERVE_{f.upper()}" for f in flags} == set(env)


def test_frontend_processes_must_be_at_least_one(monkeypatch, capsys):
    assert _settings(["serve", "--model-repository", "r"], monkeypatch).frontend_processes == 1
    with pytest.raises(SystemExit):
        _settings(["serve", "--model-repository", "r", "--frontend-processes", "0"], monkeypatch)
    assert "expected 1 or more, got '0'" in capsys.readouterr().err


def test_multi_engine_switch(monkeypatch):
    s = _settings(["serve", "--model-repository", "r"], monkeypatch, {"TRTSERVE_MULTI_ENGINE": "1"})
    assert s.engine_mode == "MULTI"


def test_flag_beats_environment(monkeypatch):
    s = _settings(["serve", "--grpc-port", "7000", "--load-model", "a", "--load-model", "b"], monkeypatch,
                  {"TRTSERVE_MODEL_REPOSITORY": "/m", "TRTSERVE_GRPC_PORT": "9001"})
    assert s.grpc_port == 7000 and s.load_models == ("a", "b")


def test_bad_value_is_a_usage_error(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _settings(["serve", "--model-repository", "r", "--model-control-mode", "poll"], monkeypatch)
    assert "invalid choice" in capsys.readouterr().err


def test_heap_keep_bytes_fits_mallopt(monkeypatch, capsys):
    assert _settings(["serve", "--model-repository", "r"], monkeypatch).heap_keep_bytes == 64 << 20
    assert _settings(["serve", "--model-repository", "r", "--heap-keep-bytes", "0"], monkeypatch).heap_keep_bytes == 0
    for bad in ("-1", str(1 << 31)):
        with pytest.raises(SystemExit):
            _settings(["serve", "--model-repository", "r", "--heap-keep-bytes", bad], monkeypatch)
        assert f"expected 0 to {(1 << 31) - 1} bytes, got '{bad}'" in capsys.readouterr().err
