"""Shared fixtures: the example model repository and one server over it for the read-only tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.server import EXAMPLES, ROOT, ServerProcess, start


@pytest.fixture(scope="session")
def example_repo():
    """The generated example repository (`make models`); generated here when missing."""
    if not all((EXAMPLES / m / "1" / "model.onnx").exists() for m in ("mlp", "tiny", "mixed", "convnet")):
        subprocess.run([sys.executable, str(ROOT / "examples" / "generate_models.py"), "--out", str(EXAMPLES)],
                       check=True)
    return EXAMPLES


@pytest.fixture(scope="session")
def server(example_repo) -> Iterator[ServerProcess]:
    """One server over the example repository, shared by tests that do not change its state."""
    with start(example_repo) as proc:
        yield proc
