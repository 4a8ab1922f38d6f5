"""`raytrain bench train`: training throughput of raytrain vs a bare PyTorch loop, side by side.

CPU (default): Ray Train + DeepSpeed with N workers vs one plain PyTorch process using the same
cores, same model, same tokens per optimizer step; alternated in rounds, ratio of medians.
GPU (`--device cuda`): the per-worker DeepSpeed step standalone (no Ray needed) vs a bare PyTorch
loop on the same GPU, with tokens/s and MFU for both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any


def _machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0],
                            "cpus": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    for mod in ("ray", "deepspeed", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def _train_section(preset_args: argparse.Namespace, use_gpu: bool, workers: int) -> dict[str, Any]:
    from raytrain.config.schema import TrainSpec

    return TrainSpec(
        num_workers=workers, use_gpu=use_gpu, zero_stage=preset_args.zero_stage, precision=preset_args.precision,
        micro_batch_size=preset_args.micro_batch_size, max_steps=preset_args.steps, warmup_steps=1,
        log_every=preset_args.steps // 3, checkpoint_every=preset_args.steps, shuffle_buffer=0, tensorboard=False,
        lr=1e-3,
    ).model_dump(mode="json")


def _model_config(args: argparse.Namespace) -> dict[str, Any]:
    from raytrain.models.presets import build_config

    return build_config(args.preset, vocab_size=args.vocab, max_position_embeddings=args.seq_len,
                        eos_token_id=0, pad_token_id=1).to_dict()


def _random_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(2, vocab, (batch, seq_len), generator=g)
        yield {"input_ids": ids, "num_tokens": torch.full((batch,), seq_len)}


def bare_pytorch(args: argparse.Namespace, device: str, batch: int) -> dict[str, float]:
    """The baseline: a plain loop, AdamW, same model and tokens per step, no framework."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from raytrain.train.engine import build_optimizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**_model_config(args))).to(device)
    # bf16 the usual way for a plain loop: fp32 weights and optimizer, bf16 autocast for the math
    # (DeepSpeed's bf16 mode likewise keeps fp32 master weights).
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16")
    opt = build_optimizer(model, 1e-3, 0.1)
    warm = max(1, args.steps // 3)
    tokens, t0 = 0, 0.0
    for i, b in enumerate(_random_batches(args.steps, batch, args.seq_len, args.vocab)):
        if i == warm:
            _sync(device)
            t0, tokens = time.perf_counter(), 0
        ids = b["input_ids"].to(device)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += ids.numel()
    _sync(device)
    return {"tokens_per_s": tokens / (time.perf_counter() - t0)}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def deepspeed_standalone(args: argparse.Namespace) -> dict[str, float]:
    """The per-worker step of raytrain (engine + micro_step) in one process, without Ray."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    import torch

    from raytrain.train.engine import build_engine, micro_step
    from raytrain.train.task import CausalLMTask

    t = _train_section(args, use_gpu=True, workers=1)
    task = CausalLMTask(_model_config(args), seed=0)
    engine, _ = build_engine(task.build_model(), t)
    warm = max(1, args.steps // 3)
    tokens, t0 = 0, 0.0
    for i, b in enumerate(_random_batches(args.steps, args.micro_batch_size, args.seq_len, args.vocab)):
        if i == warm:
            torch.cuda.synchronize()
            t0, tokens = time.perf_counter(), 0
        ids = b["input_ids"]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        micro_step(engine, task, batch, scale=1.0 / task.weight(batch))
        tokens += ids.numel()
    torch.cuda.synchronize()
    return {"tokens_per_s": tokens / (time.perf_counter() - t0)}


def ray_train(args: argparse.Namespace, root: str) -> dict[str, float]:
    """raytrain's real path: TorchTrainer + the worker loop + Ray Data streaming_split."""
    import numpy as np
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytrain.train.worker import train_loop_per_worker

    rows = args.steps * args.micro_batch_size * args.workers + args.workers * args.micro_batch_size
    rng = np.random.default_rng(0)
    ds = ray.data.from_items([{"input_ids": rng.integers(2, args.vocab, args.seq_len, dtype=np.int32),
                               "num_tokens": args.seq_len} for _ in range(rows)])
    run = f"bench-{time.time_ns()}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": _train_section(args, use_gpu=False, workers=args.workers),
                           "model_config": _model_config(args)},
        scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=run, storage_path=root),
        datasets={"train": ds},
    )
    result = trainer.fit()
    # The last report covers the steady-state interval (the first one includes start-up).
    return {"tokens_per_s": float(result.metrics["tokens_per_s"])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": "train", "machine": _machine(), "args": vars(args)}
    cfg = _model_config(args)
    from transformers import LlamaConfig

    from raytrain.models.presets import parameter_count
    from raytrain.train.flops import flops_per_token, mfu

    out["model"] = {"preset": args.preset, "parameters": parameter_count(LlamaConfig(**cfg)),
                    "flops_per_token": flops_per_token(cfg, args.seq_len)}
    if args.device == "cuda":
        import torch

        name = torch.cuda.get_device_name()
        rounds = []
        for _ in range(args.rounds):
            ours = deepspeed_standalone(args)
            bare = bare_pytorch(args, "cuda", args.micro_batch_size)
            rounds.append({"raytrain": ours, "bare": bare})
        ours_tps = statistics.median(r["raytrain"]["tokens_per_s"] for r in rounds)
        bare_tps = statistics.median(r["bare"]["tokens_per_s"] for r in rounds)
        out.update({"device": name, "rounds": rounds, "raytrain_tokens_per_s": ours_tps,
                    "bare_tokens_per_s": bare_tps, "ratio": ours_tps / bare_tps,
                    "raytrain_mfu": mfu(ours_tps, cfg, args.seq_len, 1, name),
                    "bare_mfu": mfu(bare_tps, cfg, args.seq_len, 1, name)})
        return out

    import ray
    import torch

    if not ray.is_initialized():
        ray.init(num_cpus=max(4, os.cpu_count() or 1), logging_level="WARNING", include_dashboard=False)
    rounds = []
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.rounds):
            ours = ray_train(args, root)
            torch.set_num_threads(args.workers)  # the same cores the Ray workers had between them
            bare = bare_pytorch(args, "cpu", args.micro_batch_size * args.workers)
            rounds.append({"raytrain": ours, "bare": bare})
    ours_tps = statistics.median(r["raytrain"]["tokens_per_s"] for r in rounds)
    bare_tps = statistics.median(r["bare"]["tokens_per_s"] for r in rounds)
    out.update({"device": "cpu", "rounds": rounds, "raytrain_tokens_per_s": ours_tps, "bare_tokens_per_s": bare_tps,
                "ratio": ours_tps / bare_tps})
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytrain bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", default="small", help="model preset (GPU: 1b)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (CPU mode)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sides")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--out", default=None, help="write the JSON result here too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
