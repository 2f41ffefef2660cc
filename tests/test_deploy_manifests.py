"""Kubernetes manifests and container images under deploy/: they render, validate against the
Kubernetes schemas, and agree with the server's own defaults (ports, health service names, settings,
shutdown grace) and with each other (selectors, ServiceMonitor, alerts); the Dockerfiles lint clean,
ship a non-root image, and their build recipe really produces an installable wheel.

No cluster and no registry: kubectl only renders, hadolint only reads, promtool evaluates the alert
rules against synthetic series.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import zipfile
from concurrent import futures
from pathlib import Path

import grpc
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service import cli
from service.settings import ServerSettings

from tests.deploy_tools import (
    DEPLOY, DOCKER, K8S, ROOT, container, dockerfile_instructions, dockerignore_allows,
    dockerignore_patterns, exec_form, final_stage, mounts, one, render, require_tool, run, selects,
)

OVERLAYS = ("cpu", "gpu")
# Oldest Kubernetes the manifests target (the `sleep` preStop action is on by default from 1.30) and
# the newest whose schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
EXPECTED_KINDS = {"ConfigMap", "Service", "PersistentVolumeClaim", "Deployment", "PodDisruptionBudget",
                  "HorizontalPodAutoscaler", "ServiceMonitor", "PrometheusRule"}

# The server's contract (DESIGN.md and the `trtserve serve` CLI).
GRPC_PORT, METRICS_PORT = 8001, 8002
ALERTS = {"TrtserveEngineRebuildStorm", "TrtserveBufferPoolNearCap", "TrtserveWorkerRestarting",
          "TrtserveP99LatencyHigh"}
ALERT_METRICS = {
    "TrtserveEngineRebuildStorm": {"trtserve_engine_builds_total"},
    "TrtserveBufferPoolNearCap": {"trtserve_buffer_pool_bytes", "trtserve_buffer_pool_cap_bytes"},
    "TrtserveWorkerRestarting": {"trtserve_worker_restarts_total"},
    "TrtserveP99LatencyHigh": {"trtserve_request_duration_seconds_bucket"},
}
SERVER, INIT = "trtserve", "warm-engine-cache"


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def _pod(objs: list[dict]) -> dict:
    return one(objs, "Deployment", "trtserve")["spec"]["template"]


def _settings(objs: list[dict]) -> dict[str, str]:
    return one(objs, "ConfigMap")["data"]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _env_names(command: str) -> set[str]:
    """TRTSERVE_* variables a `trtserve <command>` flag reads."""
    sub = _subcommands()[command]
    flags = [o for a in sub._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    return {"TRTSERVE_" + f[2:].upper().replace("-", "_") for f in flags}


@pytest.fixture()
def server_env(monkeypatch):
    """Set TRTSERVE_* variables exactly as given (and no others) for the CLI parser."""
    def apply(env: dict[str, str]) -> None:
        for key in [k for k in os.environ if k.startswith("TRTSERVE_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    return apply


# ---- rendering and schemas -----------------------------------------------------------------------------

def test_overlay_renders_every_resource_and_validates_against_kubernetes_schemas(rendered) -> None:
    _, objs = rendered
    assert {o["kind"] for o in objs} == EXPECTED_KINDS
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), f"duplicate objects: {names}"
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: "
                            f"{'.'.join(map(str, err.path))}: {err.message}")


def test_validation_really_rejects_a_broken_deployment(rendered) -> None:
    """Guards the test above: the validator must see an unknown field and a wrong type."""
    _, objs = rendered
    broken = yaml.safe_load(yaml.safe_dump(one(objs, "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(one(objs, "Deployment")))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[-1], strict=True)


# ---- the server's contract ---------------------------------------------------------------------------

def test_settings_parse_with_the_server_cli(rendered, server_env) -> None:
    """The ConfigMap, read the way `trtserve serve` reads its environment, configures the ports the
    pod exposes and the paths it mounts."""
    _, objs = rendered
    settings = _settings(objs)
    unknown = set(settings) - _env_names("serve")
    assert not unknown, f"not `trtserve serve` flags: {unknown}"
    server_env(settings)
    parsed = cli.settings_from_args(cli.build_parser().parse_args(["serve"]))
    server = container(_pod(objs)["spec"], SERVER)
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert (parsed.grpc_port, parsed.metrics_port) == (ports["grpc"], ports["metrics"]) == (GRPC_PORT, METRICS_PORT)
    assert parsed.host == "0.0.0.0"
    assert str(parsed.model_repository) in mounts(server) and str(parsed.engine_cache_dir) in mounts(server)
    assert parsed.model_control_mode == "none"
    configmap = one(objs, "ConfigMap")["metadata"]["name"]
    for c in (container(_pod(objs)["spec"], SERVER), container(_pod(objs)["spec"], INIT, init=True)):
        assert {"configMapRef": {"name": configmap}} in c["envFrom"], c["name"]


def test_ports_and_grpc_health_probes_match_the_server(rendered) -> None:
    _, objs = rendered
    server = container(_pod(objs)["spec"], SERVER)
    assert server.get("args", [])[:1] == ["serve"] and "command" not in server
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    for probe, service in (("startupProbe", "readiness"), ("readinessProbe", "readiness"),
                           ("livenessProbe", "liveness")):
        assert server[probe]["grpc"] == {"port": ports["grpc"], "service": service}, probe
    startup = server["startupProbe"]
    worker_timeout = float(_settings(objs).get("TRTSERVE_WORKER_START_TIMEOUT_SECONDS",
                                               ServerSettings.worker_start_timeout_seconds))
    # The kubelet must not kill a pod whose workers are still within their own start timeout.
    assert startup["periodSeconds"] * startup["failureThreshold"] > worker_timeout
    assert server["livenessProbe"]["failureThreshold"] * server["livenessProbe"]["periodSeconds"] >= 20


def test_services_route_to_named_container_ports(rendered) -> None:
    _, objs = rendered
    pod = _pod(objs)
    names = {p["name"]: p["containerPort"] for p in container(pod["spec"], SERVER)["ports"]}
    services = [o for o in objs if o["kind"] == "Service"]
    for svc in services:
        assert selects(svc["spec"]["selector"], pod["metadata"]["labels"]), svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] == port["name"] and port["name"] in names, port
            assert port["port"] == names[port["name"]]
    main = one(objs, "Service", "trtserve")
    assert {p["name"] for p in main["spec"]["ports"]} == {"grpc", "metrics"}


def test_servicemonitor_scrapes_the_metrics_port_of_exactly_one_service(rendered) -> None:
    _, objs = rendered
    monitor = one(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
                         "podTargetLabels", "sampleLimit"}
    scraped = [s for s in objs if s["kind"] == "Service"
               and selects(spec["selector"]["matchLabels"], s["metadata"].get("labels", {}))
               and any(p["name"] == "metrics" for p in s["spec"]["ports"])]
    assert [s["metadata"]["name"] for s in scraped] == ["trtserve"], "pods would be scraped twice or never"
    assert len(spec["endpoints"]) == 1
    endpoint = spec["endpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint.get("scheme", "http") == "http"
    for key in ("interval", "scrapeTimeout"):
        assert re.fullmatch(r"\d+(ms|s|m)", endpoint[key]), key
    assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])


def _seconds(duration: str) -> float:
    value, unit = re.fullmatch(r"(\d+)(ms|s|m)", duration).groups()
    return int(value) * {"ms": 0.001, "s": 1, "m": 60}[unit]


def test_termination_grace_covers_prestop_and_server_drain(rendered) -> None:
    _, objs = rendered
    spec = _pod(objs)["spec"]
    pre_stop = container(spec, SERVER)["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep_s = pre_stop["sleep"]["seconds"]
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep", command
        sleep_s = int(command[1])
    assert 1 <= sleep_s <= 15
    grace = int(_settings(objs)["TRTSERVE_SHUTDOWN_GRACE_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] > sleep_s + grace


def test_shared_memory_volume_is_memory_backed_and_bounded(rendered) -> None:
    _, objs = rendered
    spec = _pod(objs)["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in (container(spec, SERVER), container(spec, INIT, init=True)):
        shm = volumes[mounts(c)["/dev/shm"]]
        assert shm["emptyDir"]["medium"] == "Memory", c["name"]
        assert re.fullmatch(r"\d+(Mi|Gi)", shm["emptyDir"]["sizeLimit"])


def test_init_container_warms_the_cache_the_server_reads(rendered) -> None:
    _, objs = rendered
    spec, settings = _pod(objs)["spec"], _settings(objs)
    server, init = container(spec, SERVER), container(spec, INIT, init=True)
    assert init["args"][0] == "build" and "command" not in init
    assert init["image"] == server["image"], "plans are keyed by backend version: build with the same image"
    # Kubernetes leaves an unknown $(VAR) as literal text: every reference must be a setting.
    for ref in re.findall(r"\$\((\w+)\)", " ".join(init["args"])):
        assert ref in settings, ref
    cache, repo = settings["TRTSERVE_ENGINE_CACHE_DIR"], settings["TRTSERVE_MODEL_REPOSITORY"]
    for c in (server, init):
        assert cache in mounts(c) and repo in mounts(c), c["name"]
    assert mounts(init)[cache] == mounts(server)[cache]
    assert mounts(init)[repo] == mounts(server)[repo]
    cache_volume = {v["name"]: v for v in spec["volumes"]}[mounts(server)[cache]]
    claim = cache_volume["persistentVolumeClaim"]["claimName"]
    pvc = one(objs, "PersistentVolumeClaim", claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "the cache is shared by every replica"
    assert not any(m.get("readOnly") for m in server["volumeMounts"] if m["mountPath"] == cache)


def test_init_container_args_parse_with_the_server_cli(rendered, server_env) -> None:
    _, objs = rendered
    settings = _settings(objs)
    init = container(_pod(objs)["spec"], INIT, init=True)
    args = [re.sub(r"\$\((\w+)\)", lambda m: settings[m.group(1)], a) for a in init["args"]]
    assert "build" in _subcommands(), "service/cli.py has no `trtserve build` (the init container runs it)"
    server_env(settings)
    parsed = cli.build_parser().parse_args(args)
    assert parsed.command == "build"
    assert str(parsed.engine_cache_dir) == settings["TRTSERVE_ENGINE_CACHE_DIR"]
    assert str(parsed.model_repository) == settings["TRTSERVE_MODEL_REPOSITORY"]


def test_pod_runs_as_non_root_with_a_read_only_root(rendered) -> None:
    _, objs = rendered
    spec = _pod(objs)["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert "/tmp" in mounts(c), f"{c['name']}: read-only root needs a writable /tmp"
    assert spec["automountServiceAccountToken"] is False


def test_disruption_budget_and_autoscaler_target_these_pods(rendered) -> None:
    _, objs = rendered
    deployment, pod = one(objs, "Deployment"), _pod(objs)
    assert selects(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    pdb = one(objs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] >= 2, "one replica cannot honour the disruption budget"
    assert "replicas" not in deployment["spec"], "kubectl apply would reset what the HPA scaled to"
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container(pod["spec"], SERVER)["resources"]["requests"], "utilization needs a request"
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0


def test_images_are_pinned_and_match_the_overlay(rendered) -> None:
    overlay, objs = rendered
    spec = _pod(objs)["spec"]
    for c in spec["containers"] + spec["initContainers"]:
        name, _, tag = c["image"].rpartition(":")
        assert name and "/" in name, f"{c['image']}: no registry repository"
        assert tag and tag != "latest", f"{c['image']}: pin a tag"
        assert overlay in tag, f"{c['image']}: not the {overlay} image"


def test_only_the_gpu_overlay_asks_for_a_gpu(rendered) -> None:
    overlay, objs = rendered
    spec = _pod(objs)["spec"]
    for c in (container(spec, SERVER), container(spec, INIT, init=True)):
        gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (1 if overlay == "gpu" else None), c["name"]
    tolerations = {t["key"] for t in spec.get("tolerations", [])}
    assert ("nvidia.com/gpu" in tolerations) == (overlay == "gpu")


# ---- alerts ------------------------------------------------------------------------------------------

def _groups(objs: list[dict]) -> list[dict]:
    rule = one(objs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    return rule["spec"]["groups"]


def test_prometheusrule_alerts_use_trtserve_metrics(rendered) -> None:
    _, objs = rendered
    rules = [r for g in _groups(objs) for r in g["rules"]]
    alerts = [r for r in rules if "alert" in r]
    assert {r["alert"] for r in alerts} == ALERTS
    for r in rules:
        assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert ("alert" in r) != ("record" in r), r
    for r in alerts:
        used = set(re.findall(r"trtserve_\w+", r["expr"]))
        assert used == ALERT_METRICS[r["alert"]], r["alert"]
        assert r["labels"]["severity"] in {"warning", "critical"}
        assert r["annotations"]["summary"] and r["annotations"]["description"]


def test_prometheusrule_carries_the_plain_prometheus_rules() -> None:
    """deploy/prometheus/rules.yaml (for a Prometheus without the Operator) and the PrometheusRule
    must alert alike: the same alert names, and the very same groups."""
    path = DEPLOY / "prometheus" / "rules.yaml"
    plain = yaml.safe_load(path.read_text())["groups"]
    ours = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())["spec"]["groups"]
    names = {r["alert"] for g in plain for r in g["rules"] if "alert" in r}
    assert names == ALERTS
    assert ours == plain, ("deploy/k8s/base/prometheusrule.yaml spec.groups differ from "
                           "deploy/prometheus/rules.yaml groups: copy them over")


def test_rule_metrics_are_series_the_server_exports(rendered) -> None:
    _, objs = rendered
    from service import metrics

    exported = {s for name in metrics.SPECS for s in metrics.series_names(name)}
    for group in _groups(objs):
        for r in group["rules"]:
            missing = set(re.findall(r"trtserve_\w+", r["expr"])) - exported
            assert not missing, f"{r.get('alert') or r.get('record')}: {missing} not exported"


def test_alert_rules_pass_promtool(tmp_path: Path) -> None:
    """The rendered groups are valid rules, and the unit tests written for deploy/prometheus/rules.yaml
    (each alert fires for its situation and not otherwise) pass against them too."""
    promtool = require_tool("promtool")
    groups = _groups(render("cpu"))
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    run([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path)
    unit_tests = DEPLOY / "prometheus" / "rules_test.yaml"
    shutil.copy(unit_tests, tmp_path / "rules_test.yaml")
    proc = run([promtool, "test", "rules", "rules_test.yaml"], cwd=tmp_path)
    assert "SUCCESS" in proc.stdout + proc.stderr


# ---- container images ------------------------------------------------------------------------------

DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")


def _resolve_args(instructions: list[tuple[str, str]], text: str) -> str:
    """Substitute ARG defaults (global and per stage) into `text`, as the builder would by default."""
    defaults: dict[str, str] = {}
    for instr, args in instructions:
        if instr == "ARG" and "=" in args:
            key, _, value = args.partition("=")
            defaults[key] = value
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], text)


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in stage:
        if instr == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    return env


def test_dockerfiles_pass_hadolint() -> None:
    hadolint = require_tool("hadolint")
    run([hadolint, "--no-color", "--failure-threshold", "style",
         *(str(DOCKER / name) for name in DOCKERFILES)])


def test_hadolint_really_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = require_tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    proc = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_ships_a_non_root_trtserve_image(name: str) -> None:
    instructions = dockerfile_instructions(DOCKER / name)
    for instr, args in instructions:
        if instr == "FROM":
            image = _resolve_args(instructions, args.split()[0])
            repo, _, tag = image.rpartition(":")
            assert repo and tag and tag != "latest" and "/" not in tag, f"{name}: unpinned base {image}"
    stage = final_stage(instructions)
    base = _resolve_args(instructions, stage[0][1].split()[0])
    if name == "Dockerfile.gpu":
        assert base.startswith("nvcr.io/nvidia/tensorrt:") and base.endswith("-py3"), base
    else:
        assert re.fullmatch(r"python:3\.1[1-2][\w.-]*-slim[\w.-]*", base), base
    users = [args for instr, args in stage if instr == "USER"]
    assert users, f"{name}: the image runs as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, f"{name}: USER must be a numeric non-root uid, not {uid}"
    pod = one(render("cpu"), "Deployment")["spec"]["template"]["spec"]
    assert int(uid) == pod["securityContext"]["runAsUser"]

    last = {instr: args for instr, args in stage}
    assert exec_form(last["ENTRYPOINT"]) == ["trtserve"]
    assert exec_form(last["CMD"])[0] == "serve"
    assert {int(p) for p in last["EXPOSE"].split()} == {GRPC_PORT, METRICS_PORT}
    assert {"/models", "/cache"} <= set(exec_form(last["VOLUME"]))
    check = last["HEALTHCHECK"]
    assert "--start-period=" in check and "healthcheck.py" in check
    assert exec_form(check.split(" CMD ", 1)[1])[-1] == "readiness"

    env = _env(stage)
    settings = _settings(render("cpu"))
    for key in ("TRTSERVE_MODEL_REPOSITORY", "TRTSERVE_ENGINE_CACHE_DIR", "TRTSERVE_HOST",
                "TRTSERVE_GRPC_PORT", "TRTSERVE_METRICS_PORT"):
        assert env[key] == settings[key], f"{name}: {key} differs from the Kubernetes ConfigMap"
    assert {k for k in env if k.startswith("TRTSERVE_")} <= _env_names("serve")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_build_context_holds_exactly_what_the_dockerfile_copies(name: str) -> None:
    ignore = DOCKER / f"{name}.dockerignore"
    patterns = dockerignore_patterns(ignore)
    for instr, args in dockerfile_instructions(DOCKER / name):
        if instr != "COPY" or "--from=" in args:
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repository"
            assert dockerignore_allows(patterns, src), f"{ignore.name} keeps {src} out of the context"
    for kept_out in (".venv/bin/python", "examples/models/mlp/1/model.onnx", "service/proto/inference_pb2.py",
                     "service/__pycache__/errors.cpython-311.pyc", "tests/test_deploy_manifests.py",
                     ".git/HEAD", "bench/results/tmp/x.json"):
        assert not dockerignore_allows(patterns, kept_out), f"{kept_out} would be sent to the builder"


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (0,)


def test_image_build_recipe_produces_a_wheel_with_the_generated_code(tmp_path: Path) -> None:
    """Runs the build stage's own commands on a copy of the build context: the protobuf code is
    generated (it is not committed) and lands in the wheel, with the `trtserve` console script."""
    instructions = dockerfile_instructions(DOCKER / "Dockerfile")
    recipe = [args for instr, args in instructions if instr == "RUN" and "protos" in args]
    assert recipe == ["make -o .venv/.installed PY=python protos && pip wheel --no-deps --wheel-dir /wheels ."]
    assert (ROOT / "README.md").exists(), "pyproject.toml names README.md as the readme: the build needs it"
    src = tmp_path / "src"
    patterns = dockerignore_patterns(DOCKER / "Dockerfile.dockerignore")
    for path in ("pyproject.toml", "README.md", "Makefile", "protos", "service"):
        origin = ROOT / path
        if origin.is_dir():
            shutil.copytree(origin, src / path, ignore=lambda d, names: [
                n for n in names
                if not dockerignore_allows(patterns, str((Path(d) / n).relative_to(ROOT)))])
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(origin, src / path)
    assert not list((src / "service" / "proto").glob("*_pb2.py")), "context must not carry generated code"
    run(["make", "-o", ".venv/.installed", f"PY={sys.executable}", "protos"], cwd=src)
    # pyproject asks for setuptools >= 69: build offline with this environment's when it has one.
    isolation = ["--no-build-isolation"] if _setuptools_version() >= (69,) else []
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation,
         "--wheel-dir", str(tmp_path / "wheels"), "."], cwd=src, timeout=300)
    wheel, = (tmp_path / "wheels").glob("trtserve-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for generated in ("inference_pb2.py", "inference_pb2_grpc.py", "model_config_pb2.py", "_pool.py"):
        assert f"service/proto/{generated}" in names
    assert re.search(r"^trtserve\s*=\s*service\.cli:main$", entry_points, re.M), entry_points


# ---- the image's HEALTHCHECK script ------------------------------------------------------------------

@pytest.fixture()
def health_server():
    """A real grpc.health.v1 service on a free loopback port, as the server exposes it."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(grace=None)


def _healthcheck(port: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRTSERVE_GRPC_PORT": str(port)}
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py"), *args], env=env,
                          capture_output=True, text=True, timeout=30)


def test_healthcheck_follows_the_readiness_service(health_server) -> None:
    port, servicer = health_server
    servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("readiness", health_pb2.HealthCheckResponse.SERVING)
    assert _healthcheck(port).returncode == 0
    assert _healthcheck(port, "liveness").returncode == 0
    servicer.set("readiness", health_pb2.HealthCheckResponse.NOT_SERVING)  # shutting down
    failed = _healthcheck(port)
    assert failed.returncode == 1 and "NOT_SERVING" in failed.stderr
    assert _healthcheck(port, "liveness").returncode == 0


def test_healthcheck_fails_when_nothing_answers(health_server) -> None:
    port, _ = health_server
    unknown = _healthcheck(port, "readiness")  # service never registered
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, not listening: nothing answers there
        down = _healthcheck(closed)
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr
