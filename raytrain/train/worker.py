"""The Ray Train side of the training loop: a `LoopContext` backed by Ray Train, and the entry point.

The loop itself lives in ``loop.py`` and knows nothing about Ray; this module gives it rank and world
size from the worker group, the train shard from Ray Data's ``streaming_split``, ``ray.train.report``
for metrics and checkpoints, and Prometheus gauges through Ray's metrics export.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from raytrain.train.loop import DS_TAG, HF_DIR, TensorBoardSink, export_hf, fingerprint, run_training_loop

__all__ = ["DS_TAG", "HF_DIR", "RayTrainContext", "export_hf", "fingerprint", "train_loop_per_worker"]


class RayMetrics:
    """Rank-0 sinks: TensorBoard event files and Prometheus gauges through Ray's metrics export."""

    def __init__(self, run: str, tb_dir: str | None) -> None:
        from ray.util.metrics import Counter, Gauge

        from raytrain import metrics_names as m

        tags = ("run",)
        self.tags = {"run": run}
        self.gauges = {
            "loss": Gauge(m.TRAIN_LOSS, "training loss (mean over the last interval)", tag_keys=tags),
            "val_loss": Gauge(m.TRAIN_VAL_LOSS, "loss on the held-out split (every train.eval_every steps)",
                              tag_keys=tags),
            "lr": Gauge(m.TRAIN_LR, "learning rate", tag_keys=tags),
            "grad_norm": Gauge(m.TRAIN_GRAD_NORM, "global gradient norm", tag_keys=tags),
            "tokens_per_s": Gauge(m.TRAIN_TOKENS_PER_S, "training tokens per second, all ranks", tag_keys=tags),
            "step": Gauge(m.TRAIN_STEP, "optimizer steps done", tag_keys=tags),
            "mfu": Gauge(m.TRAIN_MFU, "model FLOPs utilization (0-1)", tag_keys=tags),
            "memory_bytes": Gauge(m.TRAIN_MEMORY_BYTES, "rank-0 process or device memory in use", tag_keys=tags),
        }
        self.resumes = Counter(m.TRAIN_RESUMES, "times the run resumed from a checkpoint", tag_keys=tags)
        # Online RL: the iteration's figures (metric key in the loop's report -> gauge).
        self.rl_gauges = {
            "reward_mean": Gauge(m.RL_REWARD_MEAN, "mean reward of the iteration's rollouts", tag_keys=tags),
            "reward_std": Gauge(m.RL_REWARD_STD, "std of the rollouts' rewards", tag_keys=tags),
            "kl": Gauge(m.RL_KL, "mean per-token KL estimate to the reference during the update", tag_keys=tags),
            "kl_coef": Gauge(m.RL_KL_COEF, "KL coefficient (adaptive under PPO's controller)", tag_keys=tags),
            "clip_ratio": Gauge(m.RL_CLIP_RATIO, "share of response tokens whose ratio was clipped", tag_keys=tags),
            "entropy": Gauge(m.RL_ENTROPY, "mean next-token entropy on response tokens", tag_keys=tags),
            "response_length": Gauge(m.RL_RESPONSE_LENGTH, "mean response length in tokens", tag_keys=tags),
            "value_loss": Gauge(m.RL_VALUE_LOSS, "PPO critic loss", tag_keys=tags),
            "gen_tokens_per_s": Gauge(m.RL_GEN_TOKENS_PER_S, "rollout tokens per second, all engines",
                                      tag_keys=tags),
            "train_tokens_per_s": Gauge(m.RL_TRAIN_TOKENS_PER_S, "tokens per second in the update phase",
                                        tag_keys=tags),
            "sync_bytes": Gauge(m.RL_SYNC_BYTES, "bytes of weights sent to rollout engines per iteration",
                                tag_keys=tags),
            "eval/reward": Gauge(m.RL_EVAL_REWARD, "mean reward on held-out prompts", tag_keys=tags),
        }
        self.rl_phases = Gauge(m.RL_PHASE_SECONDS, "seconds of the last iteration spent in each phase",
                               tag_keys=("run", "phase"))
        self.tb = TensorBoardSink(tb_dir) if tb_dir else None

    def emit(self, metrics: dict[str, Any]) -> None:
        for key, gauge in self.gauges.items():
            value = metrics.get(key)
            if value is not None:
                gauge.set(float(value), tags=self.tags)
        for key, gauge in self.rl_gauges.items():
            value = metrics.get(key)
            if value is not None:
                gauge.set(float(value), tags=self.tags)
        for phase in ("generate", "score", "train", "sync", "eval"):
            value = metrics.get(f"time/{phase}")
            if value is not None:
                self.rl_phases.set(float(value), tags={**self.tags, "phase": phase})
        if self.tb:
            self.tb.emit(metrics)

    def resumed(self) -> None:
        self.resumes.inc(1, tags=self.tags)


class RayTrainContext:
    """`LoopContext` inside a Ray Train worker."""

    def __init__(self) -> None:
        import ray.train

        self._ctx = ray.train.get_context()
        self.rank = self._ctx.get_world_rank()
        self.world_size = self._ctx.get_world_size()
        self.run_name = self._ctx.get_experiment_name()

    def train_shard(self, columns: tuple[str, ...]) -> Any:
        import ray.train

        # The driver selected the task's columns when it built the dataset.
        return ray.train.get_dataset_shard("train")

    def val_shard(self, columns: tuple[str, ...]) -> Any:
        import ray.train

        try:
            return ray.train.get_dataset_shard("val")
        except KeyError:
            return None

    @contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train
        from ray.train import Checkpoint

        # Ray merges every rank's files into one checkpoint and records it only when all ranks reported.
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def metrics_sink(self, tensorboard_dir: str | None) -> RayMetrics:
        return RayMetrics(self.run_name, tensorboard_dir)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config` carries the spec's train section, the model config and paths."""
    import logging

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if config["train"]["use_gpu"] else "cpu")
    if config["train"]["use_gpu"]:
        import torch
        from ray.train.torch import get_device

        # NCCL collectives (and DeepSpeed's engine) use the current device: make it the one Ray assigned.
        torch.cuda.set_device(get_device())
    ctx = RayTrainContext()
    logging.basicConfig(level=logging.INFO if ctx.rank == 0 else logging.WARNING)
    run_training_loop(ctx, config)
