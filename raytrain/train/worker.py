"""The per-worker training loop (runs inside each Ray Train worker; one DeepSpeed rank each).

Checkpoint protocol: every rank saves its DeepSpeed shard into its own local directory, then every
rank calls ``ray.train.report(..., checkpoint=...)``; Ray merges the ranks' files into one
checkpoint under the run's storage path and only then makes it the latest. A crash during a save
therefore never replaces the latest good checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

log = logging.getLogger(__name__)

DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every Ray checkpoint directory
HF_DIR = "hf"  # Hugging Face export inside every Ray checkpoint directory


def deepspeed_config(t: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed config from the `train` section of the spec."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t["micro_batch_size"],
        "gradient_accumulation_steps": t["grad_accum_steps"],
        "zero_optimization": {"stage": t["zero_stage"]},
        "bf16": {"enabled": t["precision"] == "bf16"},
        "fp16": {"enabled": t["precision"] == "fp16"},
        "steps_per_print": 10**9,  # our own metrics replace DeepSpeed's console prints
        "wall_clock_breakdown": False,
    }
    if t["grad_clip"] > 0:
        cfg["gradient_clipping"] = t["grad_clip"]
    if t["zero_stage"] == 3:
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return cfg


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1):
    """Linear warmup, then cosine decay to `min_ratio` of the peak at `total` steps."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _optimizer(model: Any, lr: float, weight_decay: float):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def export_hf(engine: Any, out_dir: str, rank: int, zero_stage: int) -> None:
    """Write a transformers directory (config + safetensors) from rank 0; all ranks must call it."""
    import deepspeed

    module = engine.module
    if zero_stage == 3:
        # Parameters are partitioned: gather full tensors on every rank, rank 0 writes them.
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if rank == 0:
                module.save_pretrained(out_dir, safe_serialization=True)
    elif rank == 0:
        module.save_pretrained(out_dir, safe_serialization=True)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config` carries the spec's train section and the model config."""
    t = config["train"]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if t["use_gpu"] else "cpu")
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from raytrain.train.task import CausalLMTask

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)
    torch.manual_seed(t["seed"])

    task = CausalLMTask(config["model_config"], seed=t["seed"], init_from=config.get("init_from"))
    model = task.build_model()
    optimizer = _optimizer(model, t["lr"], t["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t["warmup_steps"], t["max_steps"]))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(t),
        dist_init_required=False,
    )

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "tokens": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=DS_TAG)
        state.update({k: client[k] for k in state if k in client})
        if rank == 0:
            log.info("resumed from checkpoint at step %d (epoch %d)", state["step"], state["epoch"])

    shard = ray.train.get_dataset_shard("train")
    interval_loss, interval_tokens, interval_micro = 0.0, 0, 0
    t_last = time.perf_counter()

    while state["step"] < t["max_steps"]:
        saw_batch = False
        skip = state["micro_in_epoch"]  # micro-batches of this epoch already trained before a resume
        for i, batch in enumerate(task.batches(shard, t["micro_batch_size"], state["epoch"])):
            saw_batch = True
            if i < skip:
                continue
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss, ntok = task.loss(engine, batch)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            state["micro_in_epoch"] = i + 1
            interval_loss += float(loss.detach())
            interval_tokens += ntok
            interval_micro += 1
            if not boundary:
                continue
            state["step"] += 1
            step = state["step"]
            is_ckpt = step % t["checkpoint_every"] == 0 or step == t["max_steps"]
            if step % t["log_every"] == 0 or is_ckpt:
                stats = torch.tensor([interval_loss, interval_micro, interval_tokens], dtype=torch.float64)
                dist.all_reduce(stats)  # loss and tokens over all ranks
                elapsed = time.perf_counter() - t_last
                state["tokens"] += int(stats[2])
                metrics = {
                    "step": step,
                    "epoch": state["epoch"],
                    "loss": float(stats[0] / stats[1]),
                    "lr": float(scheduler.get_last_lr()[0]),
                    "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                    "tokens_per_s": float(stats[2]) / elapsed if elapsed > 0 else 0.0,
                    "tokens_seen": state["tokens"],
                }
                if rank == 0:
                    log.info("step %d  loss %.4f  lr %.2e  grad_norm %.3f  tokens/s %.0f", step, metrics["loss"],
                             metrics["lr"], metrics["grad_norm"], metrics["tokens_per_s"])
                interval_loss, interval_tokens, interval_micro = 0.0, 0, 0
                if is_ckpt:
                    _save_and_report(engine, metrics, state, rank, t["zero_stage"])
                else:
                    ray.train.report(metrics)
                t_last = time.perf_counter()
            if step >= t["max_steps"]:
                break
        if not saw_batch:
            raise RuntimeError(
                f"the train split gave rank {rank} no batch of {t['micro_batch_size']} sequences; "
                f"it needs at least num_workers x micro_batch_size = {world * t['micro_batch_size']} sequences"
            )
        if state["step"] < t["max_steps"]:
            state["epoch"] += 1
            state["micro_in_epoch"] = 0


def _save_and_report(engine: Any, metrics: dict[str, Any], state: dict[str, int], rank: int, zero_stage: int) -> None:
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix=f"raytrain-ckpt-r{rank}-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state=dict(state))
        export_hf(engine, os.path.join(tmp, HF_DIR), rank, zero_stage)
        dist.barrier()
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
