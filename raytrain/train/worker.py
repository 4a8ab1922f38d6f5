"""The per-worker training loop (runs inside each Ray Train worker; one DeepSpeed rank each).

Checkpoint protocol: every rank saves its DeepSpeed shard into its own local directory, then every
rank calls ``ray.train.report(..., checkpoint=...)``; Ray merges the ranks' files into one checkpoint
under the run's storage path and only then records it as the latest. A crash during a save therefore
never moves the latest pointer onto a partial checkpoint: a restart resumes from the previous one.

Data position: the train shard's order is deterministic (``preserve_order`` in the trainer's
DataConfig, a seeded block order and a seeded per-epoch local shuffle), so the checkpoint records
(epoch, micro-batches consumed in that epoch) and a resume skips exactly those micro-batches: no
sample is repeated or skipped, and on CPU fp32 the resumed run is bitwise the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import tempfile
import time
from typing import Any

log = logging.getLogger(__name__)

DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every Ray checkpoint directory
HF_DIR = "hf"  # Hugging Face export inside every Ray checkpoint directory


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


def fingerprint(row: Any) -> str:
    """Short stable id of one training sequence (its token bytes)."""
    return hashlib.blake2b(row.cpu().numpy().tobytes(), digest_size=8).hexdigest()


class _Metrics:
    """Rank-0 sinks: TensorBoard event files and Prometheus gauges through Ray's metrics export."""

    def __init__(self, run: str, tb_dir: str | None) -> None:
        from ray.util.metrics import Counter, Gauge

        from raytrain import metrics_names as m

        tags = ("run",)
        self.tags = {"run": run}
        self.gauges = {
            "loss": Gauge(m.TRAIN_LOSS, "training loss (mean over the last interval)", tag_keys=tags),
            "lr": Gauge(m.TRAIN_LR, "learning rate", tag_keys=tags),
            "grad_norm": Gauge(m.TRAIN_GRAD_NORM, "global gradient norm", tag_keys=tags),
            "tokens_per_s": Gauge(m.TRAIN_TOKENS_PER_S, "training tokens per second, all ranks", tag_keys=tags),
            "step": Gauge(m.TRAIN_STEP, "optimizer steps done", tag_keys=tags),
            "mfu": Gauge(m.TRAIN_MFU, "model FLOPs utilization (0-1)", tag_keys=tags),
            "memory_bytes": Gauge(m.TRAIN_MEMORY_BYTES, "rank-0 process or device memory in use", tag_keys=tags),
        }
        self.resumes = Counter(m.TRAIN_RESUMES, "times the run resumed from a checkpoint", tag_keys=tags)
        self.tb = None
        if tb_dir:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(tb_dir)

    def emit(self, metrics: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            value = metrics.get(key)
            if value is not None:
                gauge.set(float(value), tags=self.tags)
        if self.tb:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"train/{key}", value, metrics["step"])
            self.tb.flush()


def _memory_bytes(use_gpu: bool) -> int:
    import psutil
    import torch

    if use_gpu and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(psutil.Process().memory_info().rss)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config` carries the spec's train section, the model config and paths."""
    t = config["train"]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if t["use_gpu"] else "cpu")
    import ray.train
    import torch
    import torch.distributed as dist

    from raytrain import storage
    from raytrain.train.engine import build_engine, micro_step, partition_stats
    from raytrain.train.flops import mfu
    from raytrain.train.task import CausalLMTask

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING)
    torch.manual_seed(t["seed"])

    task = CausalLMTask(config["model_config"], seed=t["seed"], init_from=config.get("init_from"),
                        shuffle_buffer=t["shuffle_buffer"])
    engine, scheduler = build_engine(task.build_model(), t)

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "tokens": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            _, client = engine.load_checkpoint(d, tag=DS_TAG)
        state.update({k: client[k] for k in state if k in client})
        # RNG streams continue where the checkpointed run left them (dropout, sampling).
        if "torch_rng" in client:
            torch.set_rng_state(client["torch_rng"])
        if rank == 0:
            log.info("resumed from checkpoint at step %d (epoch %d, micro-batch %d)", state["step"],
                     state["epoch"], state["micro_in_epoch"])

    sinks = _Metrics(ctx.get_experiment_name(), config.get("tensorboard_dir")) if rank == 0 else None
    if sinks and ckpt:
        sinks.resumes.inc(1, tags=sinks.tags)
    nodes = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    device_name = torch.cuda.get_device_name() if t["use_gpu"] and torch.cuda.is_available() else "cpu"
    seq_len = config["model_config"]["max_position_embeddings"]
    sample_dir = config.get("sample_log_dir")

    shard = ray.train.get_dataset_shard("train")
    interval_loss, interval_tokens, interval_micro = 0.0, 0, 0
    step_samples: list[str] = []
    t_last = time.perf_counter()

    while state["step"] < t["max_steps"]:
        saw_batch = False
        skip = state["micro_in_epoch"]  # micro-batches of this epoch trained before the checkpoint
        for i, batch in enumerate(task.batches(shard, t["micro_batch_size"], state["epoch"])):
            saw_batch = True
            if i < skip:
                continue
            if sample_dir:
                step_samples.extend(fingerprint(row) for row in batch["input_ids"])
            loss, ntok, boundary = micro_step(engine, task, batch)
            state["micro_in_epoch"] = i + 1
            interval_loss += loss
            interval_tokens += ntok
            interval_micro += 1
            if not boundary:
                continue
            state["step"] += 1
            step = state["step"]
            if sample_dir:
                storage.write_json(storage.join(sample_dir, f"step-{step:07d}-rank{rank}.json"),
                                   {"step": step, "epoch": state["epoch"], "rank": rank, "samples": step_samples})
                step_samples = []
            is_ckpt = step % t["checkpoint_every"] == 0 or step == t["max_steps"]
            if step % t["log_every"] == 0 or is_ckpt:
                stats = torch.tensor([interval_loss, interval_micro, interval_tokens], dtype=torch.float64)
                dist.all_reduce(stats)  # loss and tokens over all ranks
                elapsed = time.perf_counter() - t_last
                state["tokens"] += int(stats[2])
                tps = float(stats[2]) / elapsed if elapsed > 0 else 0.0
                metrics = {
                    "step": step,
                    "epoch": state["epoch"],
                    "loss": float(stats[0] / stats[1]),
                    "lr": float(scheduler.get_last_lr()[0]),
                    "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                    "tokens_per_s": tps,
                    "tokens_seen": state["tokens"],
                    "mfu": mfu(tps, config["model_config"], seq_len, world, device_name),
                    "memory_bytes": _memory_bytes(t["use_gpu"]),
                    "num_nodes": len(set(nodes)),
                    **partition_stats(engine),
                }
                if sinks:
                    sinks.emit(metrics)
                    log.info("step %d  loss %.4f  lr %.2e  grad_norm %.3f  tokens/s %.0f", step, metrics["loss"],
                             metrics["lr"], metrics["grad_norm"], tps)
                interval_loss, interval_tokens, interval_micro = 0.0, 0, 0
                if is_ckpt:
                    _save_and_report(engine, metrics, state, rank, t["zero_stage"], config.get("crash_in_save_at_step"))
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


def _save_and_report(engine: Any, metrics: dict[str, Any], state: dict[str, int], rank: int, zero_stage: int,
                     crash_at: int | None) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix=f"raytrain-ckpt-r{rank}-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={**state, "torch_rng": torch.get_rng_state()})
        if crash_at is not None and state["step"] == crash_at and rank == 0:
            # Fault injection for tests: die mid-save, after the shard is written, before Ray records it.
            os.kill(os.getpid(), signal.SIGKILL)
        export_hf(engine, os.path.join(tmp, HF_DIR), rank, zero_stage)
        dist.barrier()
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
