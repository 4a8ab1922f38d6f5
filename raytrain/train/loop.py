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

    def train_shard(self, columns: tuple[str, ...]) -> Any:
        """This rank's training data (the task's `columns`): an object with Ray Data's ``iter_torch_batches``."""
        ...

    def val_shard(self, columns: tuple[str, ...]) -> Any:
        """This rank's part of the held-out split (same interface as the train shard), or None when there is none."""
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


def export_hf(engine: Any, out_dir: str, rank: int, zero_stage: int, module: Any = None) -> None:
    """Write a transformers directory (config + safetensors) from rank 0; all ranks must call it.

    A LoRA model (peft) is exported with its adapters merged into the weights, so the directory loads with
    the plain ``AutoModelFor…`` class and needs no merge step. `module`: the part of the engine's module to export
    (RL exports the policy without its critic); unset, all of it.
    """
    import deepspeed

    module = engine.module if module is None else module
    if zero_stage == 3:
        # Parameters are partitioned: gather full tensors on every rank, rank 0 writes them.
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if rank == 0:
                _save(module, out_dir)
    elif rank == 0:
        _save(module, out_dir)


def _save(module: Any, out_dir: str) -> None:
    if hasattr(module, "peft_config"):
        merged_model(module).save_pretrained(out_dir, safe_serialization=True)
    else:
        module.save_pretrained(out_dir, safe_serialization=True)


def merged_model(peft_model: Any) -> Any:
    """A plain transformers model holding base + (alpha/r)·B·A, built without touching the training model.

    (peft's ``merge_and_unload`` merges in place, which would change the weights being trained mid-run.)
    """
    import torch
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    base = peft_model.get_base_model()
    deltas = {name: mod.get_delta_weight(mod.active_adapters[0]) for name, mod in base.named_modules()
              if isinstance(mod, LoraLayer)}
    state: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            module_name, _, leaf = key.partition(".base_layer.")
            key = f"{module_name}.{leaf}"
            if leaf == "weight" and module_name in deltas:
                value = value + deltas[module_name].to(value.dtype)
        state[key] = value.detach().to("cpu", copy=True)  # off the accelerator: rank 0 holds one extra copy
    # Built on CPU (non-persistent buffers such as RoPE's are computed); its random init must not advance the RNG
    # streams the checkpoint recorded, or a resumed run would differ from an uninterrupted one.
    with torch.random.fork_rng(devices=[]):
        plain = AutoModelForCausalLM.from_config(base.config)
    plain.load_state_dict(state, strict=True)
    return plain


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
    """The `TrainTask` that `train.task.type` names (pretrain, sft, reward, dpo, rl)."""
    t = config["train"]
    kind = (t.get("task") or {}).get("type", "pretrain")
    if kind == "pretrain":
        from raytrain.train.task import CausalLMTask

        return CausalLMTask(config["model_config"], seed=t["seed"], init_from=config.get("init_from"),
                            shuffle_buffer=t["shuffle_buffer"])
    if kind == "rl":
        from raytrain.rl.task import RLTrainTask

        return RLTrainTask(config)
    from raytrain.posttrain.tasks import build_posttrain_task

    return build_posttrain_task(config)


class _Stats:
    """Per-example statistics of one reporting interval on this rank: sums, counts, extremes."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.mins: dict[str, float] = {}
        self.maxs: dict[str, float] = {}

    def add(self, stats: dict[str, Any]) -> None:
        for k, v in stats.items():
            v = v.float()
            self.sums[k] = self.sums.get(k, 0.0) + float(v.sum())
            self.counts[k] = self.counts.get(k, 0.0) + v.numel()
            self.mins[k] = min(self.mins.get(k, float("inf")), float(v.min()))
            self.maxs[k] = max(self.maxs.get(k, float("-inf")), float(v.max()))

    def reduce(self, names: list[str], extremes: tuple[str, ...], device: Any) -> dict[str, float]:
        """Means over every rank's examples (and min/max for `extremes`); collective: every rank calls it."""
        import torch
        import torch.distributed as dist

        if not names:
            return {}
        sc = torch.tensor([[self.sums.get(k, 0.0), self.counts.get(k, 0.0)] for k in names], dtype=torch.float64,
                          device=device)  # (names, 2)
        dist.all_reduce(sc)
        lo = torch.tensor([self.mins.get(k, float("inf")) for k in names], dtype=torch.float64, device=device)
        hi = torch.tensor([self.maxs.get(k, float("-inf")) for k in names], dtype=torch.float64, device=device)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        out: dict[str, float] = {}
        for i, k in enumerate(names):
            s, c = (float(x) for x in sc[i].cpu())
            out[k] = s / c if c else 0.0
            if k in extremes:
                out[f"{k}_min"], out[f"{k}_max"] = float(lo[i]), float(hi[i])
        return out


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
    task_type = (t.get("task") or {}).get("type", "pretrain")
    engine, scheduler = build_engine(task.build_model(), t)
    device = engine.device  # the process group's device: every collective's tensors live here
    task.setup(engine)

    state = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "tokens": 0}
    with ctx.latest_checkpoint() as ckpt_dir:
        if ckpt_dir:
            _, client = engine.load_checkpoint(ckpt_dir, tag=DS_TAG)
            state.update({k: client[k] for k in state if k in client})
            if hasattr(task, "load_state_dict"):  # what the task keeps besides weights (RL: KL controller, moments)
                task.load_state_dict(client)
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
    seq_len = config.get("seq_len") or config["model_config"]["max_position_embeddings"]
    sample_dir = config.get("sample_log_dir")

    shard = ctx.train_shard(task.columns)
    eval_every = int(t.get("eval_every") or 0)
    validator = _Validator(ctx, task, t, engine) if eval_every else None
    gas = t["grad_accum_steps"]
    interval = {"loss": 0.0, "weight": 0.0, "tokens": 0, "examples": 0}
    stats = _Stats()
    stat_names: list[str] | None = None
    step_samples: list[str] = []
    metrics: dict[str, Any] = {}
    t_last = time.perf_counter()
    pending: list[dict[str, Any]] = []  # the micro-batches of the optimizer step being assembled

    while state["step"] < t["max_steps"]:
        saw_batch = False
        step_at_epoch_start = state["step"]
        skip = state["micro_in_epoch"]  # micro-batches of this epoch trained before the checkpoint
        if getattr(task, "seeks", False):
            # The task skips them itself (RL: without generating the rollouts it would throw away).
            numbered = enumerate(task.batches(shard, t["micro_batch_size"], state["epoch"], start=skip), start=skip)
        else:
            numbered = enumerate(task.batches(shard, t["micro_batch_size"], state["epoch"]))
        for i, batch in numbered:
            saw_batch = True
            if i < skip:
                continue
            pending.append(batch)
            if len(pending) < gas:
                continue
            # The step's loss is a sum over every rank's micro-batches divided by their total weight (tokens or
            # pairs), known before any forward: one all-reduce per optimizer step.
            weights = [task.weight(b) for b in pending]
            total = torch.tensor([sum(weights)], dtype=torch.float64, device=device)
            dist.all_reduce(total)
            scale = world * gas / max(float(total[0]), 1.0)
            for b in pending:
                if sample_dir:
                    step_samples.extend(fingerprint(row) for row in _sample_rows(b))
                loss_sum, step_stats, boundary = micro_step(engine, task, b, scale)
                stats.add(step_stats)
                if stat_names is None:
                    stat_names = sorted(step_stats)
                interval["loss"] += loss_sum
                interval["tokens"] += task.tokens(b)
                interval["examples"] += _examples(b, task)
            interval["weight"] += sum(weights)
            pending = []
            state["micro_in_epoch"] = i + 1
            if not boundary:
                raise RuntimeError("DeepSpeed did not step at the end of grad_accum_steps micro-batches")
            state["step"] += 1
            step = state["step"]
            if sample_dir:
                # The pid lets an operator (or a fault-injection test) find exactly this run's worker.
                storage.write_json(storage.join(sample_dir, f"step-{step:07d}-rank{rank}.json"),
                                   {"step": step, "epoch": state["epoch"], "rank": rank, "pid": os.getpid(),
                                    "samples": step_samples})
                step_samples = []
            is_ckpt = step % t["checkpoint_every"] == 0 or step == t["max_steps"]
            is_eval = validator is not None and (step % eval_every == 0 or step == t["max_steps"])
            if step % t["log_every"] == 0 or is_ckpt or is_eval:
                # (4,) on the process group's device: NCCL rejects CPU tensors.
                sums = torch.tensor([interval["loss"], interval["weight"], interval["tokens"], interval["examples"]],
                                    dtype=torch.float64, device=device)
                dist.all_reduce(sums)  # over all ranks
                loss_sum, weight_sum, token_sum, example_sum = (float(x) for x in sums.cpu())
                elapsed = time.perf_counter() - t_last
                state["tokens"] += int(token_sum)
                tps = token_sum / elapsed if elapsed > 0 else 0.0
                metrics = {
                    "step": step,
                    "epoch": state["epoch"],
                    "task": task_type,
                    "loss": loss_sum / weight_sum if weight_sum else 0.0,
                    "lr": float(scheduler.get_last_lr()[0]),
                    "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                    "tokens_per_s": tps,
                    "examples_per_s": example_sum / elapsed if elapsed > 0 else 0.0,
                    "tokens_seen": state["tokens"],
                    "mfu": mfu(tps, config["model_config"], seq_len, world, device_name),
                    "memory_bytes": _memory_bytes(use_cuda),
                    "num_nodes": len(set(nodes)),
                    "device": device_name,
                    **stats.reduce(stat_names or [], task.extremes, device),
                    **partition_stats(engine),
                }
                if hasattr(task, "report_metrics"):  # the task's own figures of the interval (RL: the iteration's)
                    metrics.update(task.report_metrics(metrics))
                if is_eval:
                    metrics.update(validator.evaluate())
                if sinks:
                    sinks.emit(metrics)
                    log.info("step %d  loss %.4f  lr %.2e  grad_norm %.3f  tokens/s %.0f%s", step, metrics["loss"],
                             metrics["lr"], metrics["grad_norm"], tps,
                             f"  val_loss {metrics['val_loss']:.4f}" if "val_loss" in metrics else "")
                interval = {"loss": 0.0, "weight": 0.0, "tokens": 0, "examples": 0}
                stats = _Stats()
                if is_ckpt:
                    _save_and_report(ctx, engine, metrics, state, t["zero_stage"], use_cuda,
                                     config.get("crash_in_save_at_step"), task)
                else:
                    ctx.report(metrics)
                t_last = time.perf_counter()
            if step >= t["max_steps"]:
                break
        if not saw_batch:
            raise RuntimeError(
                f"the train split gave rank {rank} no batch of {t['micro_batch_size']} rows; "
                f"it needs at least num_workers x micro_batch_size = {world * t['micro_batch_size']} rows"
            )
        if state["step"] == step_at_epoch_start and state["micro_in_epoch"] == 0:
            raise RuntimeError(
                f"an epoch of rank {rank}'s shard holds fewer than grad_accum_steps={gas} micro-batches: no optimizer "
                f"step is possible; it needs num_workers x micro_batch_size x grad_accum_steps = "
                f"{world * t['micro_batch_size'] * gas} rows")
        if state["step"] < t["max_steps"]:
            state["epoch"] += 1
            state["micro_in_epoch"] = 0
            pending = []  # an incomplete step at the end of an epoch is dropped, on every rank alike
    return metrics


class _Validator:
    """The held-out loss (and the task's per-example statistics) of the model being trained, every `eval_every` steps.

    Each rank evaluates its part of the val split (Ray Train splits it like the train split); the micro-batches are
    read once and kept in memory (at most `eval_batches` per rank; 0: the whole part), and every rank evaluates the
    same number of them, because a ZeRO-3 forward is a collective. The figure is the task's loss summed over every
    rank's micro-batches divided by their total weight: the training loss's definition, on data it never trains on.
    """

    def __init__(self, ctx: LoopContext, task: Any, t: dict[str, Any], engine: Any) -> None:
        self.ctx, self.task, self.t, self.engine, self.device = ctx, task, t, engine, engine.device
        self.cached: list[dict[str, Any]] | None = None
        self.count = 0

    def _load(self) -> None:
        import torch
        import torch.distributed as dist

        shard = self.ctx.val_shard(self.task.columns) if hasattr(self.ctx, "val_shard") else None
        if shard is None:
            raise RuntimeError("train.eval_every is set but the run has no validation split")
        limit = int(self.t.get("eval_batches") or 0)
        cached: list[dict[str, Any]] = []
        for batch in self.task.batches(shard, self.t["micro_batch_size"], 0):
            cached.append(batch)
            if limit and len(cached) >= limit:
                break
        n = torch.tensor([len(cached)], dtype=torch.int64, device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        self.count = int(n[0])
        if self.count == 0:
            raise RuntimeError(f"the validation split gave rank {self.ctx.rank} no batch of "
                               f"{self.t['micro_batch_size']} rows; it needs at least num_workers x micro_batch_size "
                               "rows (or set train.eval_every: 0)")
        self.cached = cached[: self.count]

    def evaluate(self) -> dict[str, float]:
        """`val_loss` and `val_<statistic>`; collective: every rank calls it at the same step."""
        import torch
        import torch.distributed as dist

        if self.cached is None:
            self._load()
        engine = self.engine
        was_training = engine.module.training
        engine.module.eval()
        loss = weight = 0.0
        stats = _Stats()
        names: list[str] = []
        try:
            with torch.no_grad():
                for batch in self.cached or []:
                    weight += self.task.weight(batch)
                    on_device = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
                    loss_sum, step_stats = self.task.loss(engine, on_device)
                    loss += float(loss_sum)
                    stats.add(step_stats)
                    names = names or sorted(step_stats)
        finally:
            engine.module.train(was_training)
        sums = torch.tensor([loss, weight], dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        out = {"val_loss": float(sums[0] / sums[1]) if float(sums[1]) else 0.0}
        out.update({f"val_{k}": v for k, v in stats.reduce(names, self.task.extremes, self.device).items()})
        return out


def _sample_rows(batch: dict[str, Any]) -> Any:
    """The rows that identify a micro-batch's examples (token ids; for pairs, chosen and rejected together)."""
    return batch["input_ids"]


def _examples(batch: dict[str, Any], task: Any) -> int:
    """Examples in a micro-batch: rows, or pairs for tasks whose batches stack chosen and rejected."""
    rows = int(batch["input_ids"].shape[0])
    return rows // 2 if "chosen_len" in getattr(task, "columns", ()) else rows


def _save_and_report(ctx: LoopContext, engine: Any, metrics: dict[str, Any], state: dict[str, int],
                     zero_stage: int, use_cuda: bool, crash_at: int | None, task: Any = None) -> None:
    import torch.distributed as dist

    rank = ctx.rank
    extra = task.state_dict() if hasattr(task, "state_dict") else {}
    with tempfile.TemporaryDirectory(prefix=f"raytrain-ckpt-r{rank}-") as tmp:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={**state, **rng_state(use_cuda), **extra})
        if crash_at is not None and state["step"] == crash_at and rank == 0:
            # Fault injection for tests: die mid-save, after the shard is written, before it is published.
            os.kill(os.getpid(), signal.SIGKILL)
        module = task.export_module(engine.module) if hasattr(task, "export_module") else None
        export_hf(engine, os.path.join(tmp, HF_DIR), rank, zero_stage, module=module)
        dist.barrier()
        ctx.report(metrics, checkpoint_dir=tmp)
