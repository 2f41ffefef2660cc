"""Model repository in Triton's layout: `<repo>/<model>/config.pbtxt` and `<repo>/<model>/<version>/model.onnx`."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from service.errors import ConfigError, NotFound
from service.model_config import (
    check_onnx_model,
    datatype_of,
    model_filename,
    model_uses_gpu,
    parse_config,
    validate_config,
)
from service.proto import model_config_pb2


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as configured: KServe datatype and dims without the batch dim (-1 = any)."""

    name: str
    datatype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """Everything a worker and the frontend need to know about one served model version."""

    name: str
    version: int
    versions: tuple[int, ...]
    model_path: Path
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    backend: str
    use_gpu: bool
    config: model_config_pb2.ModelConfig

    @property
    def gpu_device(self) -> int:
        """The CUDA device the model runs on: the first `gpus` entry of its KIND_GPU group, else 0."""
        for group in self.config.instance_group:
            if group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and group.gpus:
                return int(group.gpus[0])
        return 0



CONFIG_FILENAME = "config.pbtxt"
# Triton's rule: version directories are decimal numbers without a leading zero (0/ and 01/ are ignored).
_VERSION_DIR = re.compile(r"[1-9][0-9]{0,17}")


def _is_safe_name(name: object) -> bool:
    """A model name that can only mean a direct, visible subdirectory of the repository root."""
    return (isinstance(name, str) and 0 < len(name) <= 255 and name.isprintable()
            and not name.startswith(".") and ".." not in name
            and not any(c in name for c in "/\\\0") and not Path(name).is_absolute())


def _shown(value: object) -> str:
    # Client-supplied text goes into messages and logs: bound its length, escape control characters.
    text = value if isinstance(value, str) else repr(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:128])


class ModelRepository:
    """A model repository in Triton's layout; reads the disk on every call (callers cache specs).

    Names and versions from clients are untrusted: a name that is unsafe or does not lead to a model
    directory with a config.pbtxt inside the root (symlinks included) is NotFound, like an unknown one.
    A model whose files are wrong is a ConfigError naming the file and field.
    """

    def __init__(self, root: Path) -> None:
        try:
            self._root = Path(root).resolve(strict=True)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{root}: model repository not found: {e}") from None
        if not self._root.is_dir():
            raise ConfigError(f"{root}: model repository is not a directory")

    @property
    def root(self) -> Path:
        """The repository root, resolved (symlinks followed)."""
        return self._root

    def model_names(self) -> list[str]:
        """Sorted names of the subdirectories that hold a config.pbtxt (valid or not)."""
        try:
            entries = list(self._root.iterdir())
        except OSError as e:
            raise ConfigError(f"{self._root}: cannot list the model repository: {e}") from None
        names = []
        for entry in entries:
            try:
                self._model_dir(entry.name)
            except NotFound:
                continue
            names.append(entry.name)
        return sorted(names)

    def versions(self, name: str) -> tuple[int, ...]:
        """The versions of `name` served under its version_policy, ascending."""
        model_dir, config_path, config = self._config(name)
        return tuple(self._served(model_dir, config_path, config))

    def load_spec(self, name: str, version: int | None = None) -> ModelSpec:
        """The validated spec of `name` at `version` (default: the latest served version)."""
        model_dir, config_path, config = self._config(name)
        served = self._served(model_dir, config_path, config)
        if version is None:
            version = max(served)
        elif isinstance(version, bool) or not isinstance(version, int) or version not in served:
            raise NotFound(f"version {_shown(version)} of model '{name}' is not available; "
                           f"available versions: {', '.join(map(str, served))}")
        model_path = served[version]
        if config.backend == "onnxruntime" or model_path.suffix == ".onnx":
            check_onnx_model(model_path, config, config_path)
        if config.backend == "onnxruntime":
            for kind, tensors in (("input", config.input), ("output", config.output)):
                for i, t in enumerate(tensors):
                    if datatype_of(t.data_type) == "BF16":
                        raise ConfigError(f"{config_path}: {kind}[{i}].data_type: BF16 is not supported by the "
                                          "onnxruntime backend (its Python API cannot exchange bfloat16)")

        def specs(tensors: Iterable) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t.name, datatype_of(t.data_type), tuple(t.dims)) for t in tensors)

        return ModelSpec(
            name=name, version=version, versions=tuple(served), model_path=model_path,
            max_batch_size=config.max_batch_size, inputs=specs(config.input), outputs=specs(config.output),
            backend=config.backend, use_gpu=model_uses_gpu(config, config_path), config=config,
        )

    def _model_dir(self, name: str) -> Path:
        """The resolved directory of model `name`; NotFound unless it is a safe model inside the root."""
        if _is_safe_name(name):
            try:
                resolved = (self._root / name).resolve(strict=True)
                if (resolved != self._root and resolved.is_relative_to(self._root)
                        and resolved.is_dir() and (resolved / CONFIG_FILENAME).is_file()):
                    return resolved
            except (OSError, RuntimeError, ValueError):
                pass  # unreadable, a symlink loop, a name too long: all mean "no such model"
        raise NotFound(f"model '{_shown(name)}' is not in the repository")

    def _inside(self, path: Path) -> Path:
        """`path` resolved; ConfigError if it leads outside the repository root."""
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"{path}: cannot resolve: {e}") from None
        if not resolved.is_relative_to(self._root):
            raise ConfigError(f"{path}: resolves to {resolved}, outside the model repository {self._root}")
        return resolved

    def _config(self, name: str) -> tuple[Path, Path, model_config_pb2.ModelConfig]:
        model_dir = self._model_dir(name)
        config_path = self._root / name / CONFIG_FILENAME
        self._inside(config_path)
        return model_dir, config_path, validate_config(parse_config(config_path), config_path, name)

    def _served(self, model_dir: Path, config_path: Path,
                config: model_config_pb2.ModelConfig) -> dict[int, Path]:
        """Served version -> resolved model file, ascending, per the config's version_policy."""
        filename = model_filename(config)
        available: dict[int, Path] = {}
        try:
            entries = list(model_dir.iterdir())
        except OSError as e:
            raise ConfigError(f"{model_dir}: cannot list the model directory: {e}") from None
        for entry in entries:
            if _VERSION_DIR.fullmatch(entry.name) and (entry / filename).is_file():
                available[int(entry.name)] = self._inside(entry / filename)
        if not available:
            raise ConfigError(f"{model_dir}: no version directory (a number such as 1/) holds '{filename}'")
        policy = config.version_policy
        choice = policy.WhichOneof("policy_choice")
        ordered = sorted(available)
        if choice == "all":
            served = ordered
        elif choice == "specific":
            served = sorted(set(policy.specific.versions))
            missing = [v for v in served if v not in available]
            if missing:
                raise ConfigError(f"{config_path}: version_policy.specific.versions: "
                                  f"{', '.join(map(str, missing))} not found in {model_dir} (no "
                                  f"'{filename}'); available versions: {', '.join(map(str, ordered))}")
        else:  # latest, also when no policy is given
            served = ordered[-(policy.latest.num_versions or 1):]
        return {v: available[v] for v in served}
