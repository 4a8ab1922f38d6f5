"""The RL task on the training loop without Ray (what a GPU machine without Ray runs): colocated roles in one
torch.distributed process (gloo, world size 1), DeepSpeed ZeRO-3.

Each case runs in a subprocess where `import ray` fails. One checks the weight sync itself: after the policy's
ZeRO-3-partitioned weights change, `_sync` gathers them and the rollout engine holds exactly the policy's tensors
(and the byte count is the policy's size, the critic excluded). The others run two iterations through `run_local`:
PPO (critic and policy in one engine, the export is the policy alone), and GRPO with one update per iteration, where
the old log-probs are the new ones detached (no extra forward pass): its first update must equal the one computed
with an explicit old-log-prob pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO

PROMPT_LEN = 24


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny chat parent and 16 prompts as prepared Parquet (the columns `raytrain.posttrain.data` writes)."""
    from transformers import AutoTokenizer

    from posttrain_fixtures import build_chat_parent

    root = tmp_path_factory.mktemp("rl-loop")
    parent = build_chat_parent(root)
    tok = AutoTokenizer.from_pretrained(str(parent))
    items = ["the bakery on Elm Street", "the Arlo kettle", "the novel 'Small Hours'", "the inn by the harbour"]
    texts = [f"Write a short review of {items[i % 4]}." for i in range(16)]
    ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
           for t in texts]
    ids = [i if isinstance(i, list) else i["input_ids"] for i in ids]
    rows = np.full((16, PROMPT_LEN), tok.pad_token_id, dtype=np.int32)
    for r, seq in enumerate(ids):
        rows[r, : len(seq)] = seq[-PROMPT_LEN:]
    data = root / "prompts"
    data.mkdir()
    pq.write_table(pa.table({"prompt_ids": list(rows), "prompt_len": np.array([min(len(s), PROMPT_LEN) for s in ids],
                                                                             dtype=np.int32),
                             "prompt_text": texts, "ground_truth": ["null"] * 16,
                             "row_id": [f"p{i}" for i in range(16)]}), data / "part-0.parquet")
    return {"parent": str(parent), "data": str(data), "root": str(root)}


def config(inputs: dict[str, str], algorithm: str, iterations: int, log_dir: str) -> dict:
    from raytrain.config.schema import RLTask, RolloutSpec, TrainSpec

    task = RLTask(algorithm=algorithm, n_samples=2, ppo_epochs=1, kl_coef=0.05)
    t = TrainSpec(num_workers=1, zero_stage=3, precision="fp32", micro_batch_size=8, max_steps=iterations,
                  checkpoint_every=iterations, log_every=1, warmup_steps=0, lr=1e-3, shuffle_buffer=0,
                  tensorboard=False, task=task, schedule="constant")
    rollout = RolloutSpec(prompts_per_iteration=4, max_new_tokens=16, engine_batch_size=8)
    parent = inputs["parent"]
    return {
        "train": t.model_dump(mode="json"), "init_from": parent, "model_config": {}, "seq_len": 64,
        "rl": {"rollout": rollout.model_dump(mode="json"), "prompts_per_rank": 4, "steps_per_iteration": 1,
               "iterations_per_epoch": 4, "eval_every": 0, "eval_set": [], "log_dir": log_dir,
               "eval_sampling": {"seed": 0, "max_new_tokens": 16, "temperature": 1.0},
               "ground_truth_fn": None, "critic_init": parent,
               "engine_kwargs": {"backend": "torch", "model_dir": parent, "device": "cpu", "max_batch_size": 8},
               "reference_kwargs": {"model_dir": parent},
               "reward_kwargs": {"functions": [["raytrain.posttrain.demo:reward", 1.0]]}},
    }


def run(script: str, args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), json.dumps(args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


SYNC = """
    import json, sys
    sys.modules["ray"] = None
    import torch, deepspeed
    from raytrain.train.local import LocalContext
    from raytrain.train.engine import build_engine
    from raytrain.rl.task import RLTrainTask
    args = json.loads(sys.argv[1])
    LocalContext(args["run_dir"], args["data"], use_gpu=False)  # the process group
    task = RLTrainTask(args["config"])
    engine, _ = build_engine(task.build_model(), args["config"]["train"])
    task.setup(engine)
    policy = task.policy_module(engine.module)
    params = list(policy.parameters())
    assert all(hasattr(p, "ds_numel") for p in params), "ZeRO-3 partitions every parameter"
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        torch.manual_seed(1)
        for p in params:
            p.data.add_(torch.randn_like(p.data) * 0.01)  # new weights, as an update would make
    seconds, sent = task._sync()
    model = task.my_engine.obj.engine._model
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        want = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    got = model.state_dict()
    diff = max(float((got[k] - want[k]).abs().max()) for k in want)
    size = sum(v.numel() * v.element_size() for v in want.values())
    print("RESULT " + json.dumps({"diff": diff, "sent": sent, "size": size, "seconds": seconds,
                                  "keys_match": sorted(got) == sorted(want)}))
"""

LOOP = """
    import json, sys
    sys.modules["ray"] = None
    from raytrain.train.local import run_local, latest_checkpoint_dir
    args = json.loads(sys.argv[1])
    metrics = run_local(args["config"], args["run_dir"], args["data"])
    print("RESULT " + json.dumps({"metrics": metrics, "checkpoint": str(latest_checkpoint_dir(args["run_dir"]))}))
"""


def test_zero3_sync_puts_the_gathered_policy_into_the_engine(inputs: dict[str, str], tmp_path: Path) -> None:
    cfg = config(inputs, "ppo", 1, str(tmp_path / "log"))  # PPO: a critic shares the engine but is not sent
    out = run(SYNC, {"config": cfg, "run_dir": str(tmp_path / "run"), "data": inputs["data"]})
    assert out["keys_match"]
    assert out["diff"] == 0.0
    assert out["sent"] == out["size"] > 0


def test_ppo_on_the_loop_without_ray_exports_the_policy_alone(inputs: dict[str, str], tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    cfg = config(inputs, "ppo", 2, str(tmp_path / "log"))
    out = run(LOOP, {"config": cfg, "run_dir": str(tmp_path / "run"), "data": inputs["data"]})
    m = out["metrics"]
    assert m["step"] == 2 and m["task"] == "rl" and m["iteration"] == 1
    assert m["sync_bytes"] > 0 and "value_loss" in m and 0 <= m["clip_ratio"] <= 1
    its = sorted((tmp_path / "log" / "iterations").glob("iter-*.json"))
    assert [json.loads(f.read_text())["iteration"] for f in its] == [0, 1]
    prompts = [json.loads(f.read_text())["row_ids"] for f in sorted((tmp_path / "log" / "prompts").glob("*.json"))]
    assert prompts == [["p0", "p1", "p2", "p3"], ["p4", "p5", "p6", "p7"]]
    hf = Path(out["checkpoint"]) / "hf"
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if k.startswith(("critic", "policy.", "score"))]
    AutoModelForCausalLM.from_pretrained(str(hf))


def test_grpo_single_update_skips_the_old_logprob_pass_without_changing_the_update(
        inputs: dict[str, str], tmp_path: Path) -> None:
    """One optimizer step per iteration (4 prompts x 2 samples = one micro-batch of 8): the on-policy shortcut. The
    same run forced through the explicit old-log-prob pass (`old_logp_pass`, test-only) must export the same weights:
    the shortcut changes what is computed, not the update."""
    from safetensors.torch import load_file

    exports = {}
    for name, force in (("shortcut", False), ("explicit", True)):
        cfg = config(inputs, "grpo", 2, str(tmp_path / f"{name}-log"))
        cfg["rl"]["old_logp_pass"] = force
        out = run(LOOP, {"config": cfg, "run_dir": str(tmp_path / name), "data": inputs["data"]})
        exports[name] = load_file(str(Path(out["checkpoint"]) / "hf" / "model.safetensors"))
        it = json.loads((tmp_path / f"{name}-log" / "iterations" / "iter-000001.json").read_text())
        assert ("rollout_kl" in it) == force  # the shortcut has no pre-update pass to measure it on
    diff = max(float((exports["shortcut"][k] - exports["explicit"][k]).abs().max()) for k in exports["explicit"])
    assert diff < 1e-6, diff
