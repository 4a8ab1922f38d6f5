"""The post-training stages end to end on Ray: a real local Ray instance, Ray Data preparation of the embedded
alignment demo (with its planted malformed rows), Ray Train on 2 CPU workers, exports that transformers loads.

SFT starts from a tiny parent model (a tokenizer with the ChatML template and random weights; the demo's
pretraining is exercised by the README's pipeline test), then the reward model and DPO start from the SFT export.
The DPO run loses a worker to kill -9 mid-run and must finish by itself with no step lost or repeated.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import ALIGN_DEMO, REWARD_STEPS, SFT_STEPS, dataset_path, exported_model
from raytrain.config import load_spec
from train_fixtures import samples_by_step

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

STEPS = 8
COMMON = ["train.micro_batch_size=4", f"train.max_steps={STEPS}", "train.warmup_steps=1", "train.log_every=2",
          "train.checkpoint_every=4", "train.shuffle_buffer=16", "data.max_length=112", "data.max_prompt_length=64",
          *ALIGN_DEMO]


@pytest.fixture(scope="module")
def root(aligned: dict) -> Path:
    """The session's post-training root (conftest `aligned`): a tiny chat parent, its SFT and reward models."""
    return aligned["root"]


def spec_for(root: Path, stage: str, *extra: str):
    overrides = [f"storage.root={root}", f"{stage}.parent=" + ("models/parent/v1" if stage == "sft"
                                                                else "models:/demo-lm-sft/latest")]
    overrides += [f"{stage}.{o}" for o in COMMON] + list(extra)
    return load_spec("dpo" if stage == "dpo" else stage, ["name=t", *overrides])


@pytest.fixture(scope="module")
def sft(aligned: dict) -> dict:
    return aligned["sft"]


def planted(root: Path, file: str) -> list[dict]:
    rows = json.loads(next((root / "raw").glob("alignment-demo-*/planted.json")).read_text())["rows"]
    return [r for r in rows if r.get("file", file) == file]


def test_sft_stage_accounts_for_every_row_and_exports_a_chat_model(root: Path, sft: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = next((root / "raw").glob("alignment-demo-*/sft.jsonl"))
    lines = source.read_text().splitlines()
    counts = sft["data"]
    assert counts["read"] == len(lines)  # counted at the source: every line, parseable or not
    assert counts["read"] == counts["kept"] + counts["removed"] + counts["quarantined"]
    bad = planted(root, "sft.jsonl")
    assert bad and counts["quarantined"] >= len(bad)
    for row in bad:
        assert counts["by_reason"].get(row["reason"], 0) >= 1, row
    assert sft["metrics"]["step"] == SFT_STEPS and sft["metrics"]["task"] == "sft"
    model_dir = Path(sft["model_dir"])
    assert model_dir == root / "models" / "demo-lm-sft" / "1" == exported_model(root, "t-sft")
    lineage = json.loads((model_dir / "lineage.json").read_text())
    assert lineage["parent"]["path"] == str(root / "models" / "parent" / "v1")
    assert lineage["dataset"]["name"] == "demo-sft" and lineage["task"]["type"] == "sft"
    assert lineage["dataset"]["counts"] == counts
    assert json.loads((model_dir / "eval.json").read_text())["heldout"]["response_nll"] > 0
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Review the museum."}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    AutoModelForCausalLM.from_pretrained(str(model_dir))


def test_reward_stage_trains_a_sequence_classifier(root: Path, sft: dict, aligned: dict) -> None:
    from transformers import AutoModelForSequenceClassification

    result = aligned["reward"]
    m = result["metrics"]
    assert m["task"] == "reward" and m["step"] == REWARD_STEPS
    assert {"accuracy", "margin", "reward", "reward_min", "reward_max"} <= set(m)
    assert m["reward_min"] <= m["reward"] <= m["reward_max"]
    heldout = result["heldout"]
    assert heldout["pairs"] > 0 and 0 <= heldout["accuracy"] <= 1
    model = AutoModelForSequenceClassification.from_pretrained(result["model_dir"])
    assert model.config.num_labels == 1
    lineage = json.loads((Path(result["model_dir"]) / "lineage.json").read_text())
    assert lineage["parent"]["path"] == sft["model_dir"] and lineage["parent"]["task"] == "sft"
    assert result["data"]["read"] == len(next((root / "raw").glob("alignment-demo-*/prefs.jsonl"))
                                         .read_text().splitlines())


def test_dpo_worker_killed_mid_run_finishes_with_no_step_lost_or_repeated(root: Path, sft: dict) -> None:
    """kill -9 of rank 1 after step 6 (its pid from its step-6 sample log): Ray Train restarts the worker group
    from the step-4 checkpoint and the run completes. Steps 5 and 6 are trained again after the restart on exactly
    the pairs they had before the kill (the data position resumed, nothing skipped), every step 1..8 is logged,
    and no pair appears twice (no step repeated with other data)."""
    from raytrain.posttrain.stage import run_posttrain

    killed: list[int] = []
    before: dict[int, list[str]] = {}
    step6 = root / "runs" / "t-dpo" / "samples" / "step-0000006-rank1.json"

    def killer() -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if step6.exists() and step6.with_name("step-0000006-rank0.json").exists():
                try:
                    pid = json.loads(step6.read_text())["pid"]
                except (ValueError, KeyError):
                    time.sleep(0.05)
                    continue
                proc = psutil.Process(pid)
                assert "RayTrainWorker" in " ".join(proc.cmdline()), proc.cmdline()
                proc.kill()
                killed.append(pid)
                before.update({k: v for k, v in samples_by_step(root, "t-dpo").items() if k <= 6})
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    spec = spec_for(root, "dpo", "dpo.train.max_failures=2", "dpo.train.sample_log=true", "dpo.train.lr=1e-3")
    result = run_posttrain(spec, "dpo")
    thread.join(timeout=5)
    assert killed, "the test never found a training worker to kill"
    m = result["metrics"]
    assert m["step"] == STEPS and m["task"] == "dpo"
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"} <= set(m)
    steps = samples_by_step(root, "t-dpo")
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert {k: steps[k] for k in before} == before and sorted(before)[-1] == 6
    train_rows = json.loads((dataset_path(root, "demo-prefs") / "manifest.json").read_text())["splits"]["train"]
    per_step = 2 * 4 * 2  # ranks x micro-batch pairs x (chosen, rejected)
    pairs_per_epoch = train_rows["rows"] // 8 * 8
    seen = [s for step in sorted(steps) for s in steps[step]]
    assert all(len(steps[s]) == per_step for s in steps)
    epoch = seen[: 2 * pairs_per_epoch]
    assert len(set(epoch)) == len(epoch), "a pair was trained twice within an epoch (a step repeated)"
    # The DPO export is a plain causal LM; the held-out implicit rewards use the precomputed reference.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result["model_dir"])
    assert result["heldout"]["pairs"] > 0
    assert (root / "runs" / "t-dpo" / "reference" / "reference.json").exists()


def test_rerun_with_other_inputs_is_refused_instead_of_resuming_the_old_run(root: Path, sft: dict) -> None:
    """Same run name, different task settings: the old run's checkpoints must not silently continue."""
    from raytrain.errors import StageInputError
    from raytrain.posttrain.stage import run_posttrain

    with pytest.raises(StageInputError, match=r"sft.train.run_name.*new name|other inputs \(task differ"):
        run_posttrain(spec_for(root, "sft", "sft.train.lr=3e-3", "sft.train.task.assistant_only_loss=false"), "sft")
