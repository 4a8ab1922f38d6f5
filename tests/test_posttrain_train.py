"""SFT, reward model and DPO on the shared loop: 2 CPU workers (gloo) under ZeRO-2 and ZeRO-3.

For each task and stage, one launch of two worker processes (a plain torch.distributed group, as `torchrun`
would start; the Ray Train path of the same loop is covered by tests/test_posttrain_stages.py) runs:
  A. 8 steps from the parent, checkpoints at steps 4 and 8;
  B. a fresh run directory holding only A's step-4 checkpoint: it resumes there and trains steps 5-8.
Checked: the loss falls; B ends bitwise where A ended (exact resume: same data position, RNG, optimizer); the
Hugging Face export loads with the plain transformers class and gives the training-time model's outputs on a
fixed batch (the training-time model being the fp32 weights DeepSpeed's checkpoint holds, LoRA adapters
included, and merged in the export).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, free_port
from posttrain_fixtures import add_reference_logps, build_pairs, build_parent, build_sft

STEPS, EVERY = 8, 4

RUNNER = textwrap.dedent("""
    import json, os, shutil, sys
    sys.modules["ray"] = None  # the loop must not need Ray
    import torch.distributed as dist
    from raytrain.train.local import run_local
    args = json.loads(sys.argv[1])
    a = run_local(args["config"], args["run_a"], args["data"])
    if int(os.environ["RANK"]) == 0:  # B starts from A's step-4 checkpoint only
        ckpt = "checkpoint_%07d" % args["resume_step"]
        shutil.copytree(os.path.join(args["run_a"], ckpt), os.path.join(args["run_b"], ckpt))
        open(os.path.join(args["run_b"], "latest"), "w").write(ckpt + "\\n")
    dist.barrier()
    b = run_local(args["config"], args["run_b"], args["data"])
    if int(os.environ["RANK"]) == 0:
        print("METRICS " + json.dumps({"a": a, "b": b}))
""")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("posttrain-loop")
    parent = build_parent(root / "parent")
    pairs = build_pairs(root / "pairs")
    return {"root": root, "parent": parent, "sft": build_sft(root / "sft"), "pairs": pairs,
            "pairs_ref": add_reference_logps(pairs, parent, root / "pairs-ref")}


def config(inputs: dict[str, Path], task: dict, zero: int) -> dict:
    from raytrain.config.schema import TrainSpec

    lr = 3e-2 if task.get("lora") else 5e-3  # adapters start at zero (B = 0) and move slower
    t = TrainSpec(task=task, num_workers=2, zero_stage=zero, micro_batch_size=4, grad_accum_steps=2, lr=lr,
                  max_steps=STEPS, warmup_steps=1, checkpoint_every=EVERY, log_every=EVERY, shuffle_buffer=16,
                  tensorboard=False, weight_decay=0.0)
    return {"train": t.model_dump(mode="json"), "model_config": json.loads((inputs["parent"] / "config.json")
                                                                            .read_text()),
            "init_from": str(inputs["parent"]), "seq_len": 48}


def launch(cfg: dict, run_dir: Path, data: Path) -> dict:
    args = json.dumps({"config": cfg, "run_a": str(run_dir / "a"), "run_b": str(run_dir / "b"), "data": str(data),
                       "resume_step": EVERY})
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", RUNNER, args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=REPO, env=env))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    line = next(x for x in outs[0][0].splitlines() if x.startswith("METRICS "))
    return json.loads(line.removeprefix("METRICS "))


def first_loss(run_dir: Path) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in rows if "loss" in r)


def training_time_model(task: dict, parent: Path, ckpt: Path):
    """The model the workers trained, rebuilt from the fp32 weights in the DeepSpeed checkpoint."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from raytrain.posttrain.tasks import build_posttrain_task

    model = build_posttrain_task({"train": {"task": task, "seed": 0, "shuffle_buffer": 0},
                                  "init_from": str(parent)}).build_model()
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds")
    model.load_state_dict(state, strict=True)
    return model.eval()


CASES = [
    ("sft", {"type": "sft"}, 2), ("sft", {"type": "sft", "lora": {"r": 4}}, 3),
    ("reward", {"type": "reward", "margin": 0.0}, 2), ("reward", {"type": "reward", "margin": 0.5}, 3),
    ("dpo", {"type": "dpo", "beta": 0.5}, 2),
    ("dpo", {"type": "dpo", "beta": 0.5, "reference": "model", "loss_type": "ipo"}, 3),
]


@pytest.mark.parametrize(("name", "task", "zero"), CASES,
                         ids=["sft-zero2", "sft-lora-zero3", "reward-zero2", "reward-margin-zero3",
                              "dpo-precomputed-zero2", "dpo-ipo-refmodel-zero3"])
def test_task_trains_resumes_exactly_and_exports(inputs: dict[str, Path], tmp_path: Path, name: str, task: dict,
                                                 zero: int) -> None:
    import torch

    data = {"sft": inputs["sft"], "reward": inputs["pairs"]}.get(name)
    if name == "dpo":
        data = inputs["pairs_ref"] if task.get("reference", "precomputed") == "precomputed" else inputs["pairs"]
    cfg = config(inputs, task, zero)
    m = launch(cfg, tmp_path, data)
    a, b = m["a"], m["b"]
    assert a["step"] == b["step"] == STEPS and a["task"] == name
    start = first_loss(tmp_path / "a")
    if name == "sft":
        # Full fine-tuning moves the unigram statistics fast; LoRA (projections only, B = 0 at start) moves slower.
        assert a["loss"] < start - (0.05 if task.get("lora") else 0.3) and start < math.log(128) + 0.5
    elif task.get("loss_type") == "ipo":
        assert a["loss"] < start  # (gap - 1/(2 beta))^2 falls as the gap grows
    else:
        assert a["loss"] < start and a["loss"] < math.log(2)
    if name == "reward":
        assert a["accuracy"] > 0.5 and "reward_min" in a and a["reward_min"] <= a["reward"] <= a["reward_max"]
    if name == "dpo":
        assert a["rewards/accuracies"] > 0.5 and a["rewards/margins"] > 0
        assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"} <= set(a)
    # Exact resume: B trained steps 5-8 from A's step-4 checkpoint and ends bitwise where A ended.
    assert b["loss"] == a["loss"]
    for key in ("grad_norm", "accuracy", "rewards/margins"):
        if key in a:
            assert b[key] == a[key], key

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    ckpt = tmp_path / "a" / f"checkpoint_{STEPS:07d}"
    cls = AutoModelForSequenceClassification if name == "reward" else AutoModelForCausalLM
    exported = cls.from_pretrained(str(ckpt / "hf")).eval()
    trained = training_time_model(cfg["train"]["task"], inputs["parent"], ckpt)
    ids = torch.tensor([[5, 17, 33, 64, 90, 12, 0, PAD_ID], [7, 8, 9, 10, 11, 12, 13, 0]])
    attn = (ids != PAD_ID).long()
    with torch.no_grad():
        want = trained(input_ids=ids, attention_mask=attn).logits
        got = exported(input_ids=ids, attention_mask=attn).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if name == "reward":
        assert exported.config.num_labels == 1


PAD_ID = 1
