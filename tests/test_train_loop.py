"""The per-worker training loop without Ray: what `make gpu-check` runs on a GPU machine.

`raytrain.train.local` launches the same `raytrain.train.loop.run_training_loop` the Ray Train workers run,
over a plain torch.distributed process group (gloo on CPU, NCCL on CUDA, world size 1). Each run is a
subprocess in which `import ray` fails, so the check proves the loop needs no Ray. On CPU (CI) it runs
ZeRO-2 fp32 and checks exact resume after a crash mid-save; the CUDA cases (ZeRO-2 and ZeRO-3 in bf16)
skip without a GPU and are what `make gpu-check` runs.
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

from conftest import REPO, dataset_path
from train_fixtures import build_packed_dataset

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    HAS_CUDA = False

STEPS = 8

RUNNER = textwrap.dedent("""
    import json, sys
    sys.modules["ray"] = None  # any `import ray` on this path fails: the loop must not need Ray
    from raytrain.train.local import run_local
    args = json.loads(sys.argv[1])
    metrics = run_local(args["config"], args["run_dir"], args["data_dir"], args.get("val_dir"))
    print("METRICS " + json.dumps(metrics))
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("loop-data")
    manifest = build_packed_dataset(root, seq_len=64, val_sequences=48)
    return {"root": root, "train": dataset_path(root, "tiny") / "train", "val": dataset_path(root, "tiny") / "val",
            "manifest": manifest}


def loop_config(data: dict, device: str, zero_stage: int, precision: str, **extra: object) -> dict:
    from raytrain.config.schema import TrainSpec
    from raytrain.models.presets import build_config

    t = TrainSpec(num_workers=1, use_gpu=device == "cuda", zero_stage=zero_stage, precision=precision,
                  micro_batch_size=4, max_steps=STEPS, checkpoint_every=4, log_every=2, warmup_steps=2, lr=5e-3,
                  shuffle_buffer=16, tensorboard=False, eval_every=4)
    tok = data["manifest"]["tokenizer"]
    cfg = build_config("tiny", vocab_size=tok["vocab_size"], max_position_embeddings=64, eos_token_id=0,
                       pad_token_id=1)
    return {"train": t.model_dump(mode="json"), "model_config": cfg.to_dict(), **extra}


def run(config: dict, run_dir: Path, data: dict, check: bool = True) -> subprocess.CompletedProcess:
    args = json.dumps({"config": config, "run_dir": str(run_dir), "data_dir": str(data["train"]),
                       "val_dir": str(data["val"])})
    proc = subprocess.run([sys.executable, "-c", RUNNER, args], capture_output=True, text=True, timeout=900,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def final_metrics(proc: subprocess.CompletedProcess) -> dict:
    line = next(x for x in proc.stdout.splitlines() if x.startswith("METRICS "))
    return json.loads(line.removeprefix("METRICS "))


def val_loss(model_dir: Path, data: dict, device: str) -> float:
    """The exported model's mean next-token loss over every token of the whole val split, computed here directly."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from raytrain.train.local import LocalShard

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    shard = LocalShard(data["val"], 0, 1)
    ids = torch.tensor(np.asarray(shard.columns["input_ids"]), dtype=torch.long, device=device)
    n = torch.tensor(np.asarray(shard.columns["num_tokens"]), device=device)
    mask = torch.arange(ids.shape[1], device=device)[None, :] < n[:, None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long()).logits
    labels = ids.masked_fill(~mask, -100)[:, 1:]
    total = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                              ignore_index=-100, reduction="sum")
    return float(total) / int((labels != -100).sum())


def perplexity(model_dir: Path, data: dict, device: str, untrained: bool = False) -> float:
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raytrain.train.local import LocalShard

    if untrained:
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(device).eval()
    shard = LocalShard(data["train"], 0, 1)
    ids = torch.tensor(np.asarray(shard.columns["input_ids"][:64]), dtype=torch.long, device=device)
    n = torch.tensor(np.asarray(shard.columns["num_tokens"][:64]), device=device)
    mask = torch.arange(ids.shape[1], device=device)[None, :] < n[:, None]
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100)).loss
    return math.exp(float(loss))


CASES = [
    pytest.param("cpu", 2, "fp32", id="cpu-zero2-fp32"),
    pytest.param("cuda", 2, "bf16", id="cuda-zero2-bf16", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_CUDA, reason="needs CUDA (make gpu-check)")]),
    pytest.param("cuda", 3, "bf16", id="cuda-zero3-bf16", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_CUDA, reason="needs CUDA (make gpu-check)")]),
]


@pytest.mark.parametrize(("device", "zero_stage", "precision"), CASES)
def test_loop_without_ray_trains_checkpoints_resumes_and_exports(
        data: dict, tmp_path: Path, device: str, zero_stage: int, precision: str) -> None:
    from raytrain.train.local import latest_checkpoint_dir

    ref = final_metrics(run(loop_config(data, device, zero_stage, precision), tmp_path / "ref", data))
    assert ref["step"] == STEPS
    # Held-out loss during training (train.eval_every): what the loop reports at the last step is the loss of the
    # exported weights on every token of the val split (48 sequences = 12 micro-batches of 4, none dropped).
    reports = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val_loss"] for r in reports if "val_loss" in r}
    assert list(vals) == [4, 8] and vals[8] < vals[4], vals
    direct = val_loss(latest_checkpoint_dir(tmp_path / "ref") / "hf", data, device)
    assert ref["val_loss"] == pytest.approx(direct, rel=1e-4 if device == "cpu" else 2e-2)
    assert (ref["device"] != "cpu") == (device == "cuda")
    assert ref["loss"] < math.log(data["manifest"]["tokenizer"]["vocab_size"]) - 0.5

    # Die in the middle of the step-8 save: the latest checkpoint must stay the whole step-4 one.
    crashed = run(loop_config(data, device, zero_stage, precision, crash_in_save_at_step=STEPS),
                  tmp_path / "crash", data, check=False)
    assert crashed.returncode != 0
    assert latest_checkpoint_dir(tmp_path / "crash").name == "checkpoint_0000004"
    resumed = final_metrics(run(loop_config(data, device, zero_stage, precision), tmp_path / "crash", data))
    events = [json.loads(x) for x in (tmp_path / "crash" / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resumed"} in events
    assert resumed["step"] == STEPS
    if device == "cpu":
        assert resumed["loss"] == ref["loss"]  # bitwise: fp32 on CPU, same data order after the resume
    else:  # GPU kernels are not bitwise deterministic; the resumed run must still land where the reference did
        assert resumed["loss"] == pytest.approx(ref["loss"], rel=0.05)
    if device == "cuda":
        state = torch.load(next((latest_checkpoint_dir(tmp_path / "crash") / "ds").glob("*model_states.pt")),
                           weights_only=False)
        assert "cuda_rng" in state, "checkpoints carry the CUDA RNG state"

    # The Hugging Face export reloads in plain transformers and beats an untrained model.
    hf = latest_checkpoint_dir(tmp_path / "crash") / "hf"
    trained, untrained = perplexity(hf, data, device), perplexity(hf, data, device, untrained=True)
    assert trained < 0.5 * untrained, (trained, untrained)
