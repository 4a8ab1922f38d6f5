"""Distributed pretraining on 2 CPU workers (gloo): ZeRO stages, exact resume, fault tolerance.

A real local Ray instance and real DeepSpeed; the only shortcut is a dataset built directly by the
test (tests/train_fixtures.py) instead of by the data stage, to keep the suite fast.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import dataset_path
from raytrain.config import load_spec
from train_fixtures import build_packed_dataset, samples_by_step

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

BASE = ["train.micro_batch_size=4", "train.max_steps=12", "train.checkpoint_every=4", "train.log_every=4",
        "train.warmup_steps=2", "train.lr=5e-3", "train.sample_log=true", "train.keep_checkpoints=2",
        "train.shuffle_buffer=32"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train-root")
    build_packed_dataset(root)
    return root


def spec_for(root: Path, run: str, *extra: str):
    return load_spec("tiny", [f"storage.root={root}", f"train.run_name={run}", *BASE, *extra])


@pytest.fixture(scope="module")
def reference(root: Path) -> dict:
    from raytrain.train.trainer import run_pretrain

    return run_pretrain(spec_for(root, "ref"))


def test_zero2_trains_partitions_optimizer_and_exports(reference: dict, root: Path) -> None:
    m = reference["metrics"]
    assert m["step"] == 12 and m["loss"] < math.log(400) - 0.5  # from ~ln(vocab) at init
    full_state = 2 * m["total_param_elements"]  # AdamW: exp_avg + exp_avg_sq per parameter
    assert m["optimizer_state_elements"] == pytest.approx(full_state / 2, rel=0.02)
    assert m["local_param_elements"] == m["total_param_elements"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference["model_dir"])
    assert sum(p.numel() for p in model.parameters()) == m["total_param_elements"]
    assert list((root / "runs" / "ref" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_zero_stage_trains_and_partitions(root: Path, stage: int, reference: dict) -> None:
    """Stage 1 also continues pretraining from the reference run's exported Hugging Face directory."""
    from transformers import AutoModelForCausalLM

    from raytrain.train.trainer import run_pretrain

    extra = [f"model.init_from={reference['model_dir']}"] if stage == 1 else []
    result = run_pretrain(spec_for(root, f"zero{stage}", f"train.zero_stage={stage}", "train.max_steps=6",
                                   "train.checkpoint_every=6", "train.sample_log=false", *extra))
    if stage == 1:  # starts where the reference ended, not from ~ln(vocab)
        assert result["metrics"]["loss"] < reference["metrics"]["loss"] + 0.3
    m = result["metrics"]
    assert m["loss"] < math.log(400) - 0.5
    full_state = 2 * m["total_param_elements"]
    if stage == 0:
        assert m["optimizer_state_elements"] == full_state
    else:
        assert m["optimizer_state_elements"] == pytest.approx(full_state / 2, rel=0.02)
    if stage == 3:
        assert m["local_param_elements"] == pytest.approx(m["total_param_elements"] / 2, rel=0.02)
    else:
        assert m["local_param_elements"] == m["total_param_elements"]
    # The export gathers ZeRO-3 partitions into whole tensors that transformers loads.
    model = AutoModelForCausalLM.from_pretrained(result["model_dir"])
    assert sum(p.numel() for p in model.parameters()) == m["total_param_elements"]


def test_crash_mid_checkpoint_then_exact_resume(root: Path, reference: dict) -> None:
    """Kill rank 0 in the middle of the step-8 save: the latest good checkpoint stays step 4, and a
    re-run with the same name resumes there and ends bitwise where the uninterrupted run ended."""
    from raytrain.train.trainer import run_pretrain

    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker's death in its own error types
        run_pretrain(spec_for(root, "crash"), fault_injection={"crash_in_save_at_step": 8})
    # Steps 1-7 of the crashed run were trained and logged; only the step-4 checkpoint is whole.
    assert (root / "runs" / "crash" / "samples" / "step-0000007-rank0.json").exists()
    resumed = run_pretrain(spec_for(root, "crash"))
    assert resumed["metrics"]["step"] == 12
    assert resumed["metrics"]["loss"] == reference["metrics"]["loss"]  # bitwise: CPU fp32, same order
    assert samples_by_step(root, "crash") == samples_by_step(root, "ref")


def test_each_sample_once_per_epoch(root: Path, reference: dict) -> None:
    steps = samples_by_step(root, "ref")
    assert sorted(steps) == list(range(1, 13))
    seen = [s for step in sorted(steps) for s in steps[step]]
    manifest = json.loads((dataset_path(root, "tiny") / "manifest.json").read_text())
    per_epoch = manifest["splits"]["train"]["sequences"] // 8 * 8  # drop_last over 2 ranks x 4
    first_epoch = seen[:per_epoch]
    assert len(set(first_epoch)) == len(first_epoch), "a sequence repeated within an epoch"


def test_worker_killed_mid_run_recovers_by_itself(root: Path, reference: dict) -> None:
    """kill -9 of this run's rank-1 worker after step 6 (its pid as the run reports it in its step-6
    sample log): Ray Train replaces the worker group, resumes from the step-4 checkpoint, and the run
    ends exactly like the uninterrupted one."""
    from raytrain.train.trainer import run_pretrain

    killed: list[int] = []
    step6 = root / "runs" / "killed" / "samples" / "step-0000006-rank1.json"

    def killer() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if step6.exists():
                try:
                    pid = json.loads(step6.read_text())["pid"]
                except (ValueError, KeyError):  # caught mid-write: try again
                    time.sleep(0.05)
                    continue
                proc = psutil.Process(pid)
                assert "RayTrainWorker" in " ".join(proc.cmdline()), proc.cmdline()
                proc.kill()
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_pretrain(spec_for(root, "killed", "train.max_failures=2"))
    thread.join(timeout=5)
    assert killed, "the test never found a training worker to kill"
    assert result["metrics"]["step"] == 12
    assert result["metrics"]["loss"] == reference["metrics"]["loss"]
    assert samples_by_step(root, "killed") == samples_by_step(root, "ref")
