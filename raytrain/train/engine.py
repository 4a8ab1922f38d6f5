"""DeepSpeed engine construction and the training step, with no Ray in sight.

The Ray Train worker loop (``worker.py``) and the standalone benchmark (``raytrain bench train`` on a
GPU machine without Ray) build engines and step them through these same functions, so what is
measured is what trains.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from raytrain.train.dsops import use_environment_ninja


def deepspeed_config(t: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed config from the `train` section of a spec (a dict, so workers need no pydantic)."""
    zero: dict[str, Any] = {"stage": t["zero_stage"]}
    if t.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(t["use_gpu"])}
    if t.get("offload_params"):
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(t["use_gpu"])}
    if t["zero_stage"] == 3:
        # Gathered 16-bit weights on save, so the Hugging Face export sees whole tensors.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t["micro_batch_size"],
        "gradient_accumulation_steps": t["grad_accum_steps"],
        "zero_optimization": zero,
        "bf16": {"enabled": t["precision"] == "bf16"},
        "fp16": {"enabled": t["precision"] == "fp16"},
        # Our client AdamW also runs on offloaded (CPU) partitions; DeepSpeed's CPU Adam is optional.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # our own metrics replace DeepSpeed's console prints
        "wall_clock_breakdown": False,
    }
    if t["grad_clip"] > 0:
        cfg["gradient_clipping"] = t["grad_clip"]
    return cfg


def lr_lambda(schedule: str, warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """Multiplier of the peak LR at an optimizer step: linear warmup, then cosine to `min_ratio` or constant."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(model: Any, lr: float, weight_decay: float) -> Any:
    """AdamW with no decay on norms and biases (the usual LLM recipe)."""
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # LoRA trains only matrices; ZeRO-3 drops empty groups anyway
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def build_engine(model: Any, t: dict[str, Any]) -> tuple[Any, Any]:
    """(DeepSpeed engine, LR scheduler) for `model` under the spec's train section."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if t["use_gpu"] else "cpu")
    # DeepSpeed's CPU backend loads a JIT-compiled op: with the environment's own ninja it finds the install's
    # build instead of compiling it again (raytrain.train.dsops).
    use_environment_ninja()
    import deepspeed
    import torch

    if t.get("activation_checkpointing") and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = build_optimizer(model, t["lr"], t["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(t.get("schedule", "cosine"), t["warmup_steps"], t["max_steps"], t.get("min_lr_ratio", 0.1))
    )
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(t),
        dist_init_required=not _dist_ready(),
    )
    return engine, scheduler


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def micro_step(engine: Any, task: Any, batch: dict[str, Any], scale: float) -> tuple[float, dict[str, Any], bool]:
    """Forward, backward and (at an accumulation boundary) optimizer step on one micro-batch.

    The task's loss is a sum over the micro-batch's weight (tokens or pairs). DeepSpeed divides what is
    backpropagated by the accumulation steps and averages gradients over ranks, so the caller passes
    ``scale = world_size * grad_accum_steps / (weight of the whole step on all ranks)``: the gradient is then
    exactly that of the step's loss summed over every rank's micro-batches and divided by its total weight.

    Returns (loss sum, per-example statistics, whether an optimizer step happened).
    """
    batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
    loss_sum, stats = task.loss(engine, batch)
    engine.backward(loss_sum * scale)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.step()
    return float(loss_sum.detach()), stats, boundary


def partition_stats(engine: Any) -> dict[str, int]:
    """Elements this rank holds: optimizer state, and parameters (partitioned under ZeRO-3).

    The ZeRO paper's claim made checkable: with N ranks, stages >= 1 hold ~1/N of the optimizer
    state per rank, and stage 3 also ~1/N of the parameters.
    """
    import torch

    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the client optimizer
    state_elems = 0
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                state_elems += v.numel()
    local_params, total_params = 0, 0
    for p in engine.module.parameters():
        full = getattr(p, "ds_numel", None)
        if full is not None:  # ZeRO-3: p is a placeholder, its shard is p.ds_tensor
            total_params += full
            local_params += p.ds_tensor.numel()
        else:
            total_params += p.numel()
            local_params += p.numel()
    return {"optimizer_state_elements": state_elems, "local_param_elements": local_params,
            "total_param_elements": total_params}
