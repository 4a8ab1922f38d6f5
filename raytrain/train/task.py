"""What a training stage supplies to the shared per-worker loop: its model, its batches, its loss.

Pretraining is `CausalLMTask`. Post-training stages (SFT, reward model, DPO, PPO/GRPO) implement the
same protocol with their own models, batches and losses, and reuse the loop's DeepSpeed engine,
checkpointing, metrics and fault tolerance unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class TrainTask(Protocol):
    columns: tuple[str, ...]
    """Columns of the training Parquet the task reads."""
    extremes: tuple[str, ...]
    """Per-example statistics reported with their min and max as well as their mean."""

    def build_model(self) -> torch.nn.Module:
        """The trainable module, identically initialised on every rank."""
        ...

    def setup(self, engine: Any) -> None:
        """Anything that needs the engine's device (e.g. a frozen reference model)."""
        ...

    def batches(self, shard: Any, micro_batch_size: int, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches for one epoch; every rank must yield the same number."""
        ...

    def weight(self, batch: dict[str, torch.Tensor]) -> float:
        """What the loss of this micro-batch is a sum over (target tokens, or pairs), known before the forward."""
        ...

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Tokens the micro-batch processes (throughput)."""
        ...

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the batch's weight, per-example statistics to report as means)."""
        ...


class CausalLMTask:
    """Next-token prediction on packed sequences with padding masked out of the loss; weight = target tokens."""

    columns = ("input_ids", "num_tokens")
    extremes: tuple[str, ...] = ()

    def __init__(self, model_config: dict[str, Any], seed: int, init_from: str | None = None,
                 shuffle_buffer: int = 0) -> None:
        self.model_config = model_config
        self.seed = seed
        self.init_from = init_from
        self.shuffle_buffer = shuffle_buffer

    def build_model(self) -> torch.nn.Module:
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(self.seed)
        if self.init_from:
            from raytrain.storage import local_dir

            with local_dir(self.init_from) as path:
                return AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
        return AutoModelForCausalLM.from_config(LlamaConfig(**self.model_config))

    def batches(self, shard: Any, micro_batch_size: int, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        import torch

        # A seeded local shuffle that changes every epoch and is the same on every re-run of that
        # epoch, which is what lets a resume skip exactly the micro-batches already trained.
        shuffle = {"local_shuffle_buffer_size": self.shuffle_buffer, "local_shuffle_seed": self.seed * 1000 + epoch} \
            if self.shuffle_buffer else {}
        for batch in shard.iter_torch_batches(batch_size=micro_batch_size, drop_last=True, device="cpu",
                                              dtypes={"input_ids": torch.long, "num_tokens": torch.long}, **shuffle):
            ids = batch["input_ids"]  # (batch, seq)
            mask = torch.arange(ids.shape[1])[None, :] < batch["num_tokens"][:, None]  # (batch, seq)
            yield {"input_ids": ids, "attention_mask": mask.long(), "labels": ids.masked_fill(~mask, -100)}

    def setup(self, engine: Any) -> None:
        pass

    def weight(self, batch: dict[str, torch.Tensor]) -> float:
        # Labels are shifted inside the model: the first position of each row predicts nothing.
        return float((batch["labels"][:, 1:] != -100).sum())

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import torch

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        labels = batch["labels"][:, 1:]
        loss_sum = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=-100, reduction="sum")
        return loss_sum, {}
