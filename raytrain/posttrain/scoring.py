"""Batch inference over prepared post-training data (Ray Data actors): reference log-probabilities for DPO,
held-out scores of a trained model. The same functions as training compute every number, so a precomputed
reference is what a frozen reference model in the workers would give.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raytrain.posttrain.tasks import load_causal_lm, load_reward_model, pair_batch, sequence_logps


def _torch_batch(batch: dict[str, np.ndarray], columns: tuple[str, ...]) -> dict[str, Any]:
    import torch

    return {c: torch.as_tensor(np.stack(batch[c]) if batch[c].dtype == object else batch[c]).long() for c in columns}


class _Scorer:
    """A model on this actor's device, with one intra-op thread per scheduled CPU."""

    def __init__(self, use_gpu: bool) -> None:
        import torch

        self.device = "cuda" if use_gpu else "cpu"
        if not use_gpu:
            torch.set_num_threads(1)  # one CPU per actor, as scheduled


class PairLogps(_Scorer):
    """Adds `<prefix>_chosen_logp` and `<prefix>_rejected_logp`: summed log-probs of each response's tokens."""

    def __init__(self, model_dir: str, prefix: str = "ref", use_gpu: bool = False, precision: str = "fp32") -> None:
        import torch

        super().__init__(use_gpu)
        # The policy's precision: at step 0 the policy/reference log-ratios are then zero, not rounding noise.
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.model = load_causal_lm(model_dir, seed=0).to(self.device, dtype=dtype).eval()
        self.pad_id = int(self.model.config.pad_token_id or 0)
        self.prefix = prefix

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        b = _torch_batch(batch, ("chosen_ids", "chosen_mask", "chosen_len", "rejected_ids", "rejected_mask",
                                 "rejected_len"))
        ids, attn, loss_mask = (x.to(self.device) for x in pair_batch(b, self.pad_id))
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=attn).logits
            logps, _ = sequence_logps(logits, ids, loss_mask)
        chosen, rejected = logps.float().cpu().numpy().reshape(2, -1)
        return {**batch, f"{self.prefix}_chosen_logp": chosen, f"{self.prefix}_rejected_logp": rejected}


class PairRewards(_Scorer):
    """Adds `reward_chosen` and `reward_rejected` from a one-output sequence classifier."""

    def __init__(self, model_dir: str, use_gpu: bool = False) -> None:
        super().__init__(use_gpu)
        self.model = load_reward_model(model_dir, seed=0).to(self.device).eval()
        self.pad_id = int(self.model.config.pad_token_id)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        b = _torch_batch(batch, ("chosen_ids", "chosen_mask", "chosen_len", "rejected_ids", "rejected_mask",
                                 "rejected_len"))
        ids, attn, _ = (x.to(self.device) for x in pair_batch(b, self.pad_id))
        with torch.no_grad():
            rewards = self.model(input_ids=ids, attention_mask=attn).logits[:, 0].float().cpu().numpy()
        chosen, rejected = rewards.reshape(2, -1)
        return {"reward_chosen": chosen, "reward_rejected": rejected}


class ResponseNLL(_Scorer):
    """Adds `nll` (summed negative log-likelihood of the response tokens) and `targets` (their number)."""

    def __init__(self, model_dir: str, use_gpu: bool = False) -> None:
        super().__init__(use_gpu)
        self.model = load_causal_lm(model_dir, seed=0).to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        b = _torch_batch(batch, ("input_ids", "loss_mask", "num_tokens"))
        n = int(b["num_tokens"].max())
        ids, mask = b["input_ids"][:, :n].to(self.device), b["loss_mask"][:, :n].to(self.device)
        attn = (torch.arange(n, device=self.device)[None, :] < b["num_tokens"][:, None].to(self.device)).long()
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=attn).logits
            logps, count = sequence_logps(logits, ids, mask)
        return {"nll": (-logps).float().cpu().numpy(), "targets": count.float().cpu().numpy()}


def map_with(ds: Any, cls: type, kwargs: dict[str, Any], use_gpu: bool, replicas: int, batch_size: int = 32) -> Any:
    """`ds.map_batches` with `cls` as a pool of actors (one GPU each on GPU)."""
    return ds.map_batches(cls, fn_constructor_kwargs={**kwargs, "use_gpu": use_gpu}, batch_size=batch_size,
                          batch_format="numpy", concurrency=replicas, num_gpus=1 if use_gpu else 0, num_cpus=1)
