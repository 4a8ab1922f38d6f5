"""Overfitting: training vs held-out loss of every kept checkpoint of a run, scored where the data lives.

Each Ray Train checkpoint directory under ``runs/<run>/`` holds a Hugging Face export in ``hf/``
(``raytrain.train.loop.HF_DIR``); Ray Train's ``checkpoint_manager_snapshot.json`` in the run directory says which
step each one was taken at. One Ray Data pass per run scores a capped sample of the train split and of the held-out
split with every checkpoint (the actor loads them all: tiny next to the data it saves re-reading), with the
run's own objective: LM loss (pretrain), response NLL (SFT), the DPO loss against the precomputed reference (DPO).

Flag rule: gap = held-out loss - training loss per checkpoint, in step order. A run is flagged when the gap at its
last checkpoint exceeds the smallest gap seen at any checkpoint by more than ``max_gap_growth`` (nats): the model
kept improving on what it trained on while what it had not seen stopped following.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from raytrain import storage

log = logging.getLogger(__name__)

__all__ = ["CheckpointLosses", "checkpoints", "flag", "score_run"]

SNAPSHOT = "checkpoint_manager_snapshot.json"  # written by Ray Train next to a run's checkpoints


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, Hugging Face export dir) of the run's checkpoints on storage, by step.

    Steps come from Ray Train's snapshot (the metrics reported with each checkpoint); a checkpoint it does not
    list (an older Ray, a copied run) falls back to the number in its directory name, else its rank by name.
    """
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith("checkpoint_"))
    steps: dict[str, int] = {}
    snapshot = storage.join(run_dir, SNAPSHOT)
    if storage.exists(snapshot):
        for r in storage.read_json(snapshot).get("checkpoint_results", []):
            step = (r.get("metrics") or {}).get("step")
            if isinstance(step, int):
                steps[r.get("checkpoint_dir_name")] = step
    out = []
    for rank, name in enumerate(names):
        hf = storage.join(run_dir, name, "hf")
        if not storage.exists(storage.join(hf, "config.json")):
            continue  # a checkpoint being written, or one without an export
        digits = re.fullmatch(r"checkpoint_(\d+)", name)
        out.append((steps.get(name, int(digits.group(1)) if digits else rank + 1), hf))
    return sorted(out)


class CheckpointLosses:
    """Ray Data UDF: per row, each checkpoint's loss sum and weight (`loss_<i>`, `weight_<i>`), and its split.

    `kind` is the run's objective: 'pretrain' (packed `input_ids`/`num_tokens`: token NLL), 'sft' (response NLL,
    the SFT task's own loss) or 'dpo' (the DPO task's own loss; rows carry the precomputed reference log-probs).
    """

    def __init__(self, kind: str, model_dirs: list[str], task: dict[str, Any] | None = None,
                 use_gpu: bool = False) -> None:
        import torch

        from raytrain.posttrain.tasks import build_posttrain_task, load_causal_lm

        self.device = "cuda" if use_gpu else "cpu"
        if not use_gpu:
            torch.set_num_threads(1)  # one CPU per actor, as scheduled
        self.kind = kind
        self.models = [load_causal_lm(d, seed=0).to(self.device).eval() for d in model_dirs]
        self.task = None
        if kind in ("sft", "dpo"):
            # The training task computes the loss, so these numbers are the ones the run optimised.
            self.task = build_posttrain_task({"train": {"task": task or {"type": kind}, "seed": 0, "shuffle_buffer": 0},
                                              "init_from": model_dirs[0]})
            self.task.pad_id = int(self.models[0].config.pad_token_id or 0)

    def _batch(self, b: dict[str, Any]) -> dict[str, Any]:
        import torch

        from raytrain.posttrain.tasks import _cat, pair_batch

        if self.kind == "dpo":
            ids, attn, loss_mask = pair_batch(b, self.task.pad_id)
            return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask,
                    "ref_logp": _cat(b["ref_chosen_logp"], b["ref_rejected_logp"])}
        n = int(b["num_tokens"].max())
        attn = (torch.arange(n)[None, :] < b["num_tokens"][:, None]).long()  # (batch, n)
        ids = b["input_ids"][:, :n]
        return {"input_ids": ids, "attention_mask": attn, "loss_mask": b["loss_mask"][:, :n] if "loss_mask" in b
                else attn}

    def _loss(self, model: Any, batch: dict[str, Any]) -> tuple[float, float]:
        import torch.nn.functional as F

        if self.task is not None:
            loss, _ = self.task.loss(model, batch)
            return float(loss), float(self.task.weight(batch))
        ids, attn = batch["input_ids"], batch["attention_mask"]
        logits = model(input_ids=ids, attention_mask=attn).logits  # (batch, seq, vocab)
        targets = ids[:, 1:].masked_fill(attn[:, 1:] == 0, -100)  # (batch, seq-1)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100, reduction="sum")
        return float(nll), float((targets != -100).sum())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        splits = np.asarray(batch["split"]).astype(str)
        cols = [c for c in batch if c != "split"]
        out: dict[str, Any] = {"split": [], "rows": [], **{f"{p}_{i}": [] for i in range(len(self.models))
                                               for p in ("loss", "weight")}}
        # A batch may hold rows of both splits: score each split's rows as one task batch.
        for split in sorted(set(splits)):
            rows = splits == split
            b = {c: torch.as_tensor(np.stack(batch[c][rows]) if batch[c].dtype == object else batch[c][rows])
                 for c in cols}
            b = {c: v.float() if c.startswith("ref_") else v.long() for c, v in b.items()}
            tensors = {k: v.to(self.device) for k, v in self._batch(b).items()}
            out["split"].append(split)
            out["rows"].append(int(rows.sum()))
            with torch.no_grad():
                for i, model in enumerate(self.models):
                    loss, weight = self._loss(model, tensors)
                    out[f"loss_{i}"].append(loss)
                    out[f"weight_{i}"].append(weight)
        return {k: np.asarray(v) for k, v in out.items()}


def _with_split(batch: Any, split: str) -> Any:
    import pyarrow as pa

    if "split" in batch.column_names:
        batch = batch.drop_columns(["split"])
    return batch.append_column("split", pa.array([split] * batch.num_rows, pa.string()))


def score_run(kind: str, run_dir: str, split_paths: dict[str, str], columns: list[str], *, max_rows: int,
              batch_size: int = 32, task: dict[str, Any] | None = None, use_gpu: bool = False,
              max_gap_growth: float = 0.1) -> dict[str, Any]:
    """Training and held-out loss of every checkpoint of `run_dir`: ``{points: [{step, train_loss, val_loss, gap}],
    flagged, reason}``. `split_paths` maps 'train' and 'val' to prepared Parquet directories."""
    from raytrain.data.readers import read_prepared

    ckpts = checkpoints(run_dir)
    if not ckpts:
        return {"points": [], "flagged": False, "reason": f"no checkpoint with a Hugging Face export in {run_dir}"}
    parts = [read_prepared(path, columns=columns).limit(max_rows).map_batches(_with_split, fn_args=(split,),
                                                                               batch_format="pyarrow")
             for split, path in split_paths.items()]
    ds = parts[0].union(*parts[1:])
    scored = ds.map_batches(CheckpointLosses, fn_constructor_args=(kind, [d for _, d in ckpts], task, use_gpu),
                            batch_size=batch_size, batch_format="numpy", concurrency=1,
                            num_gpus=1 if use_gpu else 0, num_cpus=1).to_pandas()
    sums = scored.groupby("split").sum(numeric_only=True)
    points = []
    for i, (step, _) in enumerate(ckpts):
        loss = {s: float(sums.loc[s, f"loss_{i}"] / max(sums.loc[s, f"weight_{i}"], 1e-9)) for s in sums.index}
        points.append({"step": step, "train_loss": loss.get("train", float("nan")),
                       "val_loss": loss.get("val", float("nan")),
                       "gap": loss.get("val", float("nan")) - loss.get("train", float("nan"))})
    return {**flag(points, max_gap_growth), "points": points, "rows": {s: int(sums.loc[s, "rows"]) for s in sums.index}}


def flag(points: list[dict[str, Any]], max_gap_growth: float) -> dict[str, Any]:
    """The module's flag rule over points in step order: ``{flagged, reason, gap_growth}``."""
    gaps = [p["gap"] for p in points if np.isfinite(p["gap"])]
    if len(gaps) < 2:
        return {"flagged": False, "gap_growth": 0.0,
                "reason": f"{len(gaps)} checkpoint(s) scored: at least 2 are needed to see the gap grow"}
    growth = gaps[-1] - min(gaps)
    flagged = growth > max_gap_growth
    verdict = "exceeds" if flagged else "is within"
    return {"flagged": flagged, "gap_growth": growth,
            "reason": f"held-out minus training loss at the last checkpoint ({gaps[-1]:.4f}) is {growth:.4f} above "
                      f"its smallest ({min(gaps):.4f}): {verdict} max_gap_growth {max_gap_growth}"}
