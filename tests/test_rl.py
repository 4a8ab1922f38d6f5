"""Online RL end to end on a real local Ray: the embedded alignment demo, 2 CPU training workers (DeepSpeed ZeRO-2,
gloo), rollout engines on the serving engine, a reward function and a trained reward model.

The session's `aligned` fixture (conftest) trains one SFT model and one reward model from a tiny random parent (the
demo's pretraining is covered by the README's pipeline test); this module runs three RL jobs from that SFT model:

* GRPO with the demo's rule as a `module:function` reward, everything colocated in the training workers, with a
  training worker killed (SIGKILL) mid-run;
* the same GRPO job with split placement (engines, reference and reward model in their own Ray actors), with a
  rollout engine actor killed mid-run: it must give the colocated run's result, iteration by iteration;
* PPO (critic, GAE, KL penalty in the reward, adaptive KL controller) against the trained reward model.

The margins and the KL bound the issue asks to state are `MIN_GAIN` and `MAX_KL`: the mean ground-truth reward of
one sampled response per held-out prompt (the demo's hidden rule, in [-1, 1]) must rise by at least MIN_GAIN over
the SFT model's, while the policy's KL to the SFT model (nats per response, the mean over the last iteration's
responses) stays below MAX_KL.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import align_spec, dataset_path

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

MIN_GAIN = 0.3  # ground-truth reward of the RL policy minus the SFT model's, on the held-out prompts
MAX_KL = 25.0  # nats per response: the KL the policy may drift from the SFT model in 12 iterations
ITERATIONS = 12


@pytest.fixture(scope="module")
def root(aligned: dict) -> Path:
    """The session's post-training root (conftest `aligned`): its SFT model is the policy's parent and its reward
    model PPO's reward."""
    return aligned["root"]


@pytest.fixture(scope="module")
def sft(aligned: dict) -> str:
    return aligned["sft"]["model_dir"]


@pytest.fixture(scope="module")
def reward_model(aligned: dict) -> str:
    return aligned["reward"]["model_dir"]


def rl_spec(root: Path, run: str, *extra: str) -> Any:
    return align_spec(root, "rl", "rl.parent=models:/demo-lm-sft/latest", f"rl.train.run_name={run}",
                 f"rl.iterations={ITERATIONS}", "rl.checkpoint_every=3", "rl.eval_every=6", "rl.eval_prompts=32",
                 "rl.rollout.max_new_tokens=48", "rl.train.max_failures=2", *extra)


GRPO = ["rl.reward.functions=[{name: 'raytrain.posttrain.demo:reward'}]", "rl.train.task.algorithm=grpo",
        "rl.train.task.n_samples=4", "rl.train.task.kl_coef=0.1", "rl.train.lr=1e-3"]


def prompt_logs(root: Path, run: str) -> dict[tuple[int, int], dict[str, Any]]:
    """{(iteration, rank): that iteration's prompt log} of a run."""
    out = {}
    for f in (root / "runs" / run / "rl" / "prompts").glob("iter-*-rank*.json"):
        doc = json.loads(f.read_text())
        out[(doc["iteration"], doc["rank"])] = doc
    return out


def kill_when(path: Path, find_pid: Any, killed: list[int], snapshot: Any) -> threading.Thread:
    """A thread that, once `path` exists, SIGKILLs the process `find_pid()` names and records a snapshot."""

    def run() -> None:
        deadline = time.time() + 900
        while time.time() < deadline:
            if path.exists():
                try:
                    pid = find_pid()
                except (ValueError, KeyError, LookupError):
                    time.sleep(0.05)
                    continue
                snapshot()
                psutil.Process(pid).kill()
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def check_prompt_stream(root: Path, run: str, iterations: int, world: int = 2) -> list[list[str]]:
    """Every iteration has one log per rank, each with that rank's share; no prompt appears twice in an epoch and
    every prompt comes from the train split. Returns the prompts of each iteration (ranks in order)."""
    import pyarrow.parquet as pq

    logs = prompt_logs(root, run)
    assert sorted(logs) == [(i, r) for i in range(iterations) for r in range(world)]
    train = set(pq.read_table(dataset_path(root, "demo-prompts") / "train", columns=["row_id"])
                .column("row_id").to_pylist())
    per_iter = [[x for r in range(world) for x in logs[(i, r)]["row_ids"]] for i in range(iterations)]
    by_epoch: dict[int, list[str]] = {}
    for i in range(iterations):
        by_epoch.setdefault(logs[(i, 0)]["epoch"], []).extend(per_iter[i])
    for epoch, ids in by_epoch.items():
        assert len(set(ids)) == len(ids), f"a prompt was trained twice in epoch {epoch}"
        assert set(ids) <= train
    return per_iter


@pytest.fixture(scope="module")
def grpo_colocated(root: Path, sft: str) -> dict[str, Any]:
    """GRPO, colocated, rank 1 killed once iteration 4 has started (the last checkpoint is after iteration 2)."""
    from raytrain.rl.stage import run_rl

    run = "grpo-colocated"
    killed: list[int] = []
    before: dict[Any, Any] = {}
    trigger = root / "runs" / run / "rl" / "prompts" / "iter-000004-rank1.json"

    def pid() -> int:
        found = json.loads(trigger.read_text())["pid"]
        assert "RayTrainWorker" in " ".join(psutil.Process(found).cmdline())
        return found

    thread = kill_when(trigger, pid, killed, lambda: before.update(prompt_logs(root, run)))
    result = run_rl(rl_spec(root, run, *GRPO))
    thread.join(timeout=5)
    return {"result": result, "killed": killed, "before": before, "run": run}


def test_grpo_with_a_rule_reward_raises_the_ground_truth_reward_and_survives_a_killed_worker(
        root: Path, grpo_colocated: dict[str, Any]) -> None:
    result, run = grpo_colocated["result"], grpo_colocated["run"]
    assert grpo_colocated["killed"], "the test never found a training worker to kill"
    check_prompt_stream(root, run, ITERATIONS)
    # The iterations trained again after the restart used the prompts they had before the kill.
    after = prompt_logs(root, run)
    assert {k: v["row_ids"] for k, v in grpo_colocated["before"].items()} == \
        {k: after[k]["row_ids"] for k in grpo_colocated["before"]}
    its = result["iterations"]
    assert [it["iteration"] for it in its] == list(range(ITERATIONS))
    for key in ("reward_mean", "reward_std", "kl", "clip_ratio", "entropy", "response_length", "gen_tokens_per_s",
                "train_tokens_per_s", "time/generate", "time/score", "time/train", "time/sync", "sync_bytes",
                "share/generate", "share/train"):
        assert all(key in it for it in its), key
    assert all(it["sync_bytes"] > 0 for it in its)
    held = result["heldout"]
    assert held["ground_truth_gain"] >= MIN_GAIN, held
    assert its[-1]["rollout_kl"] <= MAX_KL, its[-1]
    assert "eval/ground_truth_reward" in its[6]  # logged during training every eval_every iterations
    assert result["metrics"]["step"] == ITERATIONS * 2  # 8 prompts x 4 samples per rank, micro-batches of 16
    lineage = json.loads((Path(result["model_dir"]) / "lineage.json").read_text())
    assert lineage["task"]["algorithm"] == "grpo" and lineage["parent"]["model"] == "demo-lm-sft"
    assert lineage["reward"]["functions"][0]["name"] == "raytrain.posttrain.demo:reward"
    assert lineage["dataset"]["name"] == "demo-prompts"
    counts = result["data"]
    assert counts["read"] == counts["kept"] + counts["removed"] + counts["quarantined"]
    planted = [r for r in json.loads(next((root / "raw").glob("alignment-demo-*/planted.json")).read_text())["rows"]
               if r["file"] == "prompts.jsonl"]
    assert counts["quarantined"] >= len(planted) > 0


def test_split_placement_with_a_killed_engine_gives_the_colocated_result(
        root: Path, grpo_colocated: dict[str, Any]) -> None:
    """The same job with engines, reference and reward model in Ray actors; engine 0 is killed once iteration 4
    has started. Ray restarts it, the worker re-syncs the current weights into it and asks again: the responses are
    the ones the lost engine would have sampled (seeded per prompt and sample), so every iteration's prompts and
    figures equal the colocated run's (which lost a training worker instead)."""
    import ray

    from raytrain.rl.stage import run_rl

    run = "grpo-split"
    killed: list[int] = []
    trigger = root / "runs" / run / "rl" / "prompts" / "iter-000004-rank0.json"

    def pid() -> int:
        found = ray.get(ray.get_actor(f"raytrain-rl-{run}-engine-0").pid.remote(), timeout=30)
        assert "RoleActor" in " ".join(psutil.Process(found).cmdline())
        return found

    thread = kill_when(trigger, pid, killed, lambda: None)
    result = run_rl(rl_spec(root, run, *GRPO, "rl.rollout.placement=split", "rl.rollout.num_cpus=0.25"))
    thread.join(timeout=5)
    assert killed, "the test never found the engine actor to kill"
    with pytest.raises(ValueError):
        ray.get_actor(f"raytrain-rl-{run}-engine-0")  # the stage stopped its actors
    split_prompts = check_prompt_stream(root, run, ITERATIONS)
    assert split_prompts == check_prompt_stream(root, grpo_colocated["run"], ITERATIONS)
    colocated = grpo_colocated["result"]["iterations"]
    for a, b in zip(result["iterations"], colocated, strict=True):
        for key in ("reward_mean", "response_length", "rollout_kl", "kl", "clip_ratio"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["iteration"], key)
    assert result["heldout"]["ground_truth_reward"] == pytest.approx(
        grpo_colocated["result"]["heldout"]["ground_truth_reward"])


def test_ppo_with_the_trained_reward_model_raises_the_ground_truth_reward(
        root: Path, sft: str, reward_model: str) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from raytrain.rl.stage import run_rl

    result = run_rl(rl_spec(root, "ppo", "rl.reward.model=models:/demo-lm-reward/latest",
                            "rl.train.task.algorithm=ppo", "rl.train.task.n_samples=2",
                            "rl.rollout.prompts_per_iteration=32", "rl.train.task.ppo_epochs=2",
                            "rl.train.task.kl_coef=0.05", "rl.train.task.adaptive_kl={target: 8.0, horizon: 2000}",
                            "rl.train.lr=1e-3"))
    held, its = result["heldout"], result["iterations"]
    assert held["ground_truth_gain"] >= MIN_GAIN, held
    assert held["reward_gain"] > 0  # the reward model's own view agrees
    assert its[-1]["rollout_kl"] <= MAX_KL, its[-1]
    assert all("value_loss" in it for it in its)
    assert len({round(it["kl_coef"], 9) for it in its}) > 1  # the adaptive controller moved the coefficient
    assert result["metrics"]["step"] == ITERATIONS * 4  # 2 passes x 32 responses per rank / 16 per micro-batch
    # The export is the policy alone: a causal LM without the critic's weights.
    model_dir = Path(result["model_dir"])
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "critic" in k or k.startswith("score")]
    AutoModelForCausalLM.from_pretrained(str(model_dir))
    lineage = json.loads((model_dir / "lineage.json").read_text())
    assert lineage["reward"]["model"]["model"] == "demo-lm-reward"


def test_bad_rl_settings_fail_before_any_worker_starts(root: Path) -> None:
    from raytrain.config import ConfigError
    from raytrain.errors import StageInputError
    from raytrain.rl.stage import run_rl

    with pytest.raises(ConfigError, match="n_samples >= 2"):
        rl_spec(root, "bad", "rl.train.task.algorithm=grpo", "rl.train.task.n_samples=1")
    with pytest.raises(ConfigError, match="prompts_per_iteration"):
        rl_spec(root, "bad", "rl.rollout.prompts_per_iteration=15")
    spec = rl_spec(root, "bad", "rl.parent=models/parent/v1", "rl.reward.functions=[{name: 'raytrain.nothing:here'}]")
    t0 = time.time()
    with pytest.raises(StageInputError, match=r"raytrain\.nothing"):
        run_rl(spec)
    assert time.time() - t0 < 10
