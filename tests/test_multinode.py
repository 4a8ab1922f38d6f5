"""Training across a real 2-node Ray cluster (second node joined with `ray start --address`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster_fixtures import ray_cluster
from conftest import REPO
from train_fixtures import build_packed_dataset

pytestmark = pytest.mark.slow


def test_one_worker_per_node(tmp_path: Path) -> None:
    build_packed_dataset(tmp_path)
    with ray_cluster(nodes=2) as cluster:
        env = {k: v for k, v in cluster.items() if k not in ("gcs", "token")}
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.pretrain", "--config", "tiny", f"storage.root={tmp_path}",
             f"cluster.address={cluster['gcs']}", "train.placement_strategy=STRICT_SPREAD", "train.max_steps=4",
             "train.warmup_steps=1", "train.checkpoint_every=4", "train.log_every=2", "train.micro_batch_size=4"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index('{\n  "stage"'):])
    assert summary["metrics"]["num_nodes"] == 2
    assert summary["metrics"]["step"] == 4
    assert (Path(summary["model_dir"]) / "model.safetensors").is_file()
