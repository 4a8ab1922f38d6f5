"""The per-worker training loop, written against a small context so that it runs with or without Ray.

In production the context is Ray Train's (``worker.RayTrainContext``): rank and world size from the
worker group, the train shard from Ray Data's ``streaming_split``, ``ray.train.report`` for metrics and
checkpoints. On a GPU machine where Ray cannot be installed, ``local.LocalContext`` provides the same five
things from a plain ``torch.distributed`` process group (torchrun or one process) and local Parquet
files, so ``make gpu-check`` runs this very loop under NCCL.

Checkpoint protocol: every rank saves its DeepSpeed shard into its own local directory, then every rank
hands it to ``ctx.report(..., checkpoint_dir=...)``; the context publishes it as the latest checkpoint only
once every rank's files are in place (Ray merges the ranks' files into one checkpoint under the run's
storage path; the local context renames a complete staging directory). A crash during a save therefore
never moves the latest pointer onto a partial checkpoint: a restart resumes from the previous one.

Data position: the train shard's order is deterministic (``preserve_order`` in the trainer's DataConfig,
a seeded block order and a seeded per-epoch local shuffle), so the checkpoint records (epoch, micro-batches
consumed in that epoch) and a resume skips exactly those micro-batches: no sample is repeated or skipped,
and on CPU fp32 the resumed run is bitwise the uninterrupted one.

Collectives run on the process group's device (``engine.device``): NCCL takes only CUDA tensors, gloo
only CPU ones.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import tempfile
import time
from contextlib import AbstractContextManager
from typing import Any, Protocol

log = logging.getLogger(__name__)

DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every checkpoint directory
HF_DIR = "hf"  # Hugging Face export inside every checkpoint directory


class MetricsSink(Protocol):
    def emit(self, metrics: dict[str, Any]) -> None:
        """Record one interval's metrics (rank 0 only)."""
        ...

    def resumed(self) -> None:
        """Count a resume from a checkpoint."""
        ...


class LoopContext(Protocol):
    """What the loop needs from whoever launched it (Ray Train, or a plain torch.distributed launcher)."""

    rank: int
    world_size: int
    run_name: str

    def train_shard(self) -> Any:
        """This rank's training data: an object with Ray Data's ``iter_torch_batches`` signature."""
        ...

    def latest_checkpoint(self) -> AbstractContextManager[str | None]:
        """A local directory holding the latest published checkpoint (None when starting fresh)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Publish metrics (and a checkpoint, when given); every rank calls it the same number of times."""
        ...

    def node_id(self) -> str:
        """Which machine this rank runs on (for the num_nodes metric)."""
        ...

    def metrics_sink(self, tensorboard_dir: str | None) -> MetricsSink | None:
        """Rank 0's metric sinks (None on other ranks)."""
        ...


class TensorBoardSink:
    """TensorBoard event files (local storage roots only)."""

    def __init__(self, tb_dir: str) -> None:
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(tb_dir)

    def emit(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(f"train/{key}", value, metrics["step"])
        self.writer.flush()

    def resumed(self) -> None:
        pass


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


def rng_state(use_cuda: bool) -> dict[str, Any]:
    """Every RNG stream a step may draw from: CPU, and each visible CUDA device when training on GPU."""
    import torch

    state: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if use_cuda and torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(client: dict[str, Any], use_cuda: bool) -> None:
    import torch

    if "torch_rng" in client:
        torch.set_rng_state(client["torch_rng"])
    cuda = client.get("cuda_rng")
    if use_cuda and cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # a different number of visible devices: at least this rank's own stream continues
            torch.cuda.set_rng_state(cuda[min(torch.cuda.current_device(), len(cuda) - 1)])


def _memory_bytes(use_gpu: bool) -> int:
    import psutil
    import torch

    if use_gpu and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(psutil.Process().memory_info().rss)


def build_task(config: dict[str, Any]) -> Any:
    from raytrain.train.task import CausalLMTask

    t = config["train"]
    return CausalLMTask(config["model_config"], seed=t["seed"], init_from=config.get("init_from"),
                        shuffle_buffer=t["shuffle_buffer"])


def run_training_loop(ctx: LoopContext, config: dict[str, Any]) -> dict[str, Any]:
    """Train until ``train.max_steps``; returns the last reported metrics.

    `config` carries the spec's train section (a dict), the transformers model config, ``init_from`` and
    optional paths (``tensorboard_dir``, ``sample_log_dir``) and test-only fault injection
    (``crash_in_save_at_step``).
    """
    t = config["train"]
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if t["use_gpu"] else "cpu")
    import torch
    import torch.distributed as dist

    from raytrain import storage
    from raytrain.train.engine import build_engine, micro_step, partition_stats
    from raytrain.train.flops import mfu

    rank, world = ctx.rank, ctx.world_size
    use_cuda = bool(t["use_gpu"])
    torch.manual_seed(t["seed"])

    task = build_task(config)
    engine, scheduler = build_engine(task.build_model(), t)
    device = engine.device  # the process group's device: every collective's tensors live here

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "tokens": 0}
    with ctx.latest_checkpoint() as ckpt_dir:
        if ckpt_dir:
            _, client = engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
            state.update({k: client[k] for k in state if k in client})
            # RNG streams continue where the checkpointed run left them (dropout, sampling).
            restore_rng(client, use_cuda)
            if rank == 0:
                log.info("resumed from checkpoint at step %d (epoch %d, micro-batch %d)", state["step"],
                         state["epoch"], state["micro_in_epoch"])
    resumed = ckpt_dir is not None

    sinks = ctx.metrics_sink(config.get("tensorboard_dir")) if rank == 0 else None
    if sinks and resumed:
        sinks.resumed()
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, ctx.node_id())
    device_name = torch.cuda.get_device_name() if use_cuda and torch.cuda.is_available() else "cpu"
    seq_len = config["model_config"]["max_position_embeddings"]
    sample_dir = config.get("sample_log_dir")

    shard = ctx.train_shard()
    interval_loss, interval_tokens, interval_micro = 0.0, 0, 0
    step_samples: list[str] = []
    metrics: dict[str, Any] = {}
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
                # The pid lets an operator (or a fault-injection test) find exactly this run's worker.
                storage.write_json(storage.join(sample_dir, f"step-{step:07d}-rank{rank}.json"),
                                   {"step": step, "epoch": state["epoch"], "rank": rank, "pid": os.getpid(),
                                    "samples": step_samples})
                step_samples = []
            is_ckpt = step % t["checkpoint_every"] == 0 or step == t["max_steps"]
            if step % t["log_every"] == 0 or is_ckpt:
                # (3,) on the process group's device: NCCL rejects CPU tensors.
                stats = torch.tensor([interval_loss, interval_micro, interval_tokens], dtype=torch.float64,
                                     device=device)
                dist.all_reduce(stats)  # loss and tokens over all ranks
                loss_sum, micro_sum, token_sum = (float(x) for x in stats.cpu())
                elapsed = time.perf_counter() - t_last
                state["tokens"] += int(token_sum)
                tps = token_sum / elapsed if elapsed > 0 else 0.0
                metrics = {
                    "step": step,
                    "epoch": state["epoch"],
                    "loss": loss_sum / micro_sum,
                    "lr": float(scheduler.get_last_lr()[0]),
                    "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                    "tokens_per_s": tps,
                    "tokens_seen": state["tokens"],
                    "mfu": mfu(tps, config["model_config"], seq_len, world, device_name),
                    "memory_bytes": _memory_bytes(use_cuda),
                    "num_nodes": len(set(nodes)),
                    "device": device_name,
                    **partition_stats(engine),
                }
                if sinks:
                    sinks.emit(metrics)
                    log.info("step %d  loss %.4f  lr %.2e  grad_norm %.3f  tokens/s %.0f", step, metrics["loss"],
                             metrics["lr"], metrics["grad_norm"], tps)
                interval_loss, interval_tokens, interval_micro = 0.0, 0, 0
                if is_ckpt:
                    _save_and_report(ctx, engine, metrics, state, t["zero_stage"], use_cuda,
                                     config.get("crash_in_save_at_step"))
                else:
                    ctx.report(metrics)
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
    return metrics


def _save_and_report(ctx: LoopContext, engine: Any, metrics: dict[str, Any], state: dict[str, int],
                     zero_stage: int, use_cuda: bool, crash_at: int | None) -> None:
    import torch.distributed as dist

    rank = ctx.rank
    with tempfile.TemporaryDirectory(prefix=f"raytrain-ckpt-r{rank}-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={**state, **rng_state(use_cuda)})
        if crash_at is not None and state["step"] == crash_at and rank == 0:
            # Fault injection for tests: die mid-save, after the shard is written, before it is published.
            os.kill(os.getpid(), signal.SIGKILL)
        export_hf(engine, os.path.join(tmp, HF_DIR), rank, zero_stage)
        dist.barrier()
        ctx.report(metrics, checkpoint_dir=tmp)
