"""The training loop without Ray: a `LoopContext` over a plain torch.distributed process group.

This is what runs on a GPU machine where Ray cannot be installed (``make gpu-check``), and what a test
uses to check the loop on CPU without a cluster. Launch one process (world size 1) or several with
``torchrun --nproc-per-node N``; each rank reads every N-th row of the packed Parquet shards, in file
order, so every rank sees the same number of rows.

Checkpoints: each rank writes its files into ``<run_dir>/.staging-<step>/``; after a barrier rank 0
renames the staging directory to ``checkpoint_<step>`` and only then rewrites ``latest`` (atomically).
A crash mid-save leaves a staging directory that nothing points at, and the previous checkpoint stays
the latest. Metrics go to ``<run_dir>/metrics.jsonl`` (and TensorBoard when asked).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class LocalShard:
    """This rank's rows of packed Parquet shards, with Ray Data's ``iter_torch_batches`` signature."""

    def __init__(self, data_dir: str | Path, rank: int, world_size: int, columns: tuple[str, ...] = (
            "input_ids", "num_tokens")) -> None:
        import pyarrow.parquet as pq

        files = sorted(Path(data_dir).rglob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no Parquet files under {data_dir}")
        tables = [pq.read_table(f, columns=list(columns)) for f in files]
        cols: dict[str, np.ndarray] = {}
        for c in columns:
            parts = [t.column(c).to_numpy(zero_copy_only=False) for t in tables]
            values = np.concatenate(parts)
            cols[c] = np.stack(values) if values.dtype == object else values  # list columns -> (rows, seq)
        n = len(cols[columns[0]]) // world_size * world_size  # equal rows per rank, like streaming_split(equal=True)
        self.columns = {c: v[rank:n:world_size] for c, v in cols.items()}
        self.num_rows = n // world_size

    def iter_batches(self, *, batch_size: int, batch_format: str = "numpy", drop_last: bool = False
                     ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of numpy columns in row order (Ray Data's ``iter_batches`` with ``batch_format="numpy"``)."""
        if batch_format != "numpy":
            raise ValueError(f"LocalShard.iter_batches supports batch_format 'numpy', not {batch_format!r}")
        stop = self.num_rows - self.num_rows % batch_size if drop_last else self.num_rows
        for start in range(0, stop, batch_size):
            yield {c: v[start:start + batch_size] for c, v in self.columns.items()}

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False, device: str = "cpu",
                           dtypes: dict[str, Any] | None = None, local_shuffle_buffer_size: int | None = None,
                           local_shuffle_seed: int | None = None) -> Iterator[dict[str, Any]]:
        import torch

        order = np.arange(self.num_rows)
        if local_shuffle_buffer_size:
            # Seeded shuffle within consecutive windows of the buffer size: the same order on every re-run of
            # an epoch, which is what exact resume needs (Ray's buffer shuffle has the same property).
            rng = np.random.default_rng(local_shuffle_seed)
            for start in range(0, len(order), local_shuffle_buffer_size):
                window = order[start:start + local_shuffle_buffer_size]
                order[start:start + local_shuffle_buffer_size] = rng.permutation(window)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield {c: torch.as_tensor(v[idx], dtype=(dtypes or {}).get(c), device=device)
                   for c, v in self.columns.items()}


class JsonlMetrics:
    """Rank-0 sink: one JSON line per report, plus TensorBoard when a directory is given."""

    def __init__(self, path: Path, tb_dir: str | None) -> None:
        self.path = path
        self.tb = None
        if tb_dir:
            from raytrain.train.loop import TensorBoardSink

            self.tb = TensorBoardSink(tb_dir)

    def emit(self, metrics: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(metrics, default=str) + "\n")
        if self.tb:
            self.tb.emit(metrics)

    def resumed(self) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"event": "resumed"}) + "\n")


class LocalContext:
    """`LoopContext` for a torch.distributed launcher (torchrun, or a single process)."""

    def __init__(self, run_dir: str | Path, data_dir: str | Path, use_gpu: bool,
                 val_dir: str | Path | None = None) -> None:
        import torch
        import torch.distributed as dist

        for key, default in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, default)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("use_gpu is set but torch sees no CUDA device")
            torch.cuda.set_device(self.local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_gpu else "gloo")
        self.run_dir = Path(run_dir)
        self.run_name = self.run_dir.name
        self.data_dir = data_dir
        self.val_dir = val_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.published: list[Path] = []

    def train_shard(self, columns: tuple[str, ...]) -> LocalShard:
        return LocalShard(self.data_dir, self.rank, self.world_size, columns=tuple(columns))

    def val_shard(self, columns: tuple[str, ...]) -> LocalShard | None:
        return LocalShard(self.val_dir, self.rank, self.world_size, columns=tuple(columns)) if self.val_dir else None

    @contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        latest = self.run_dir / "latest"
        yield str(self.run_dir / latest.read_text().strip()) if latest.exists() else None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import torch.distributed as dist

        if checkpoint_dir is None:
            return
        step = int(metrics["step"])
        staging = self.run_dir / f".staging-{step:07d}"
        final = self.run_dir / f"checkpoint_{step:07d}"
        if self.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)  # leftovers of a crashed save of the same step
        dist.barrier()
        shutil.copytree(checkpoint_dir, staging, dirs_exist_ok=True)  # each rank adds its own shard files
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
            tmp = self.run_dir / ".latest.tmp"
            tmp.write_text(final.name + "\n")
            os.replace(tmp, self.run_dir / "latest")  # the commit point
            self.published.append(final)
        dist.barrier()

    def node_id(self) -> str:
        return socket.gethostname()

    def metrics_sink(self, tensorboard_dir: str | None) -> JsonlMetrics:
        return JsonlMetrics(self.run_dir / "metrics.jsonl", tensorboard_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def latest_checkpoint_dir(run_dir: str | Path) -> Path | None:
    latest = Path(run_dir) / "latest"
    return Path(run_dir) / latest.read_text().strip() if latest.exists() else None


def run_local(config: dict[str, Any], run_dir: str | Path, data_dir: str | Path,
              val_dir: str | Path | None = None) -> dict[str, Any]:
    """Run `raytrain.train.loop` in this process (one rank of a torch.distributed group)."""
    from raytrain.train.loop import run_training_loop

    ctx = LocalContext(run_dir, data_dir, use_gpu=bool(config["train"]["use_gpu"]), val_dir=val_dir)
    return run_training_loop(ctx, config)
