"""Perplexity of an exported model on held-out data, computed where the data lives (Ray Data).

The `perplexity` suite of the eval stage (raytrain.eval.suites) drives it."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from raytrain import storage

log = logging.getLogger(__name__)


class NegLogLikelihood:
    """Ray Data UDF: packed sequences -> summed token negative log-likelihood and token count.

    With `untrained=True` it scores a freshly initialised model of the same config: the baseline
    a trained model must beat.
    """

    def __init__(self, model_dir: str, untrained: bool = False, seed: int = 0, use_gpu: bool = False,
                 dtype: str = "fp32") -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        # Ray gives each GPU actor one device and sets CUDA_VISIBLE_DEVICES accordingly: it is cuda:0 here.
        self.device = torch.device("cuda" if use_gpu else "cpu")
        torch_dtype = torch.bfloat16 if dtype == "bf16" and use_gpu else torch.float32
        with storage.local_dir(model_dir) as d:
            if untrained:
                torch.manual_seed(seed)
                self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(d)), dtype=torch_dtype)
            else:
                self.model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch_dtype)
        self.model.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F

        ids = torch.tensor(np.stack(batch["input_ids"]), dtype=torch.long, device=self.device)  # (batch, seq)
        n = torch.tensor(np.asarray(batch["num_tokens"]), dtype=torch.long, device=self.device)
        mask = torch.arange(ids.shape[1], device=self.device)[None, :] < n[:, None]  # (batch, seq)
        with torch.no_grad():  # grad mode is per thread, and Ray Data may call from another thread
            logits = self.model(input_ids=ids, attention_mask=mask.long()).logits  # (batch, seq, vocab)
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)  # (batch, seq-1)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100, reduction="none")
        return {"nll": nll.sum(dim=1).double().cpu().numpy(), "tokens": (targets != -100).sum(dim=1).cpu().numpy()}


def perplexity(ds: Any, model_dir: str, batch_size: int, untrained: bool = False, seed: int = 0,
               use_gpu: bool = False, replicas: int = 1, dtype: str = "fp32") -> dict[str, float]:
    """Corpus perplexity (token-weighted) of `model_dir` over `ds`, scored by `replicas` Ray Data actors."""
    scored = ds.map_batches(NegLogLikelihood, fn_constructor_args=(model_dir, untrained, seed, use_gpu, dtype),
                            batch_size=batch_size, batch_format="numpy", concurrency=replicas,
                            num_gpus=1 if use_gpu else 0)
    sums = scored.sum(["nll", "tokens"])
    nll, tokens = float(sums["sum(nll)"]), int(sums["sum(tokens)"])
    return {"perplexity": math.exp(nll / tokens) if tokens else float("nan"), "nll_per_token": nll / max(tokens, 1),
            "tokens": tokens}


class NegLogLikelihoods:
    """Ray Data UDF: several models' `NegLogLikelihood` on each batch (`nll_<i>`, `tokens_<i>`), so comparing a
    model with its parent and an untrained baseline reads and batches the data once, on one pool of actors."""

    def __init__(self, models: list[tuple[str, bool]], seed: int = 0, use_gpu: bool = False,
                 dtype: str = "fp32") -> None:
        self.scorers = [NegLogLikelihood(path, untrained, seed, use_gpu, dtype) for path, untrained in models]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i, scorer in enumerate(self.scorers):
            scored = scorer(batch)
            out[f"nll_{i}"], out[f"tokens_{i}"] = scored["nll"], scored["tokens"]
        return out


def perplexities(ds: Any, models: list[tuple[str, bool]], batch_size: int, seed: int = 0, use_gpu: bool = False,
                 replicas: int = 1, dtype: str = "fp32") -> list[dict[str, float]]:
    """`perplexity` of each (model_dir, untrained) of `models` over `ds`, in one pass over the data."""
    scored = ds.map_batches(NegLogLikelihoods, fn_constructor_args=(models, seed, use_gpu, dtype),
                            batch_size=batch_size, batch_format="numpy", concurrency=replicas,
                            num_gpus=1 if use_gpu else 0)
    cols = [f"{k}_{i}" for i in range(len(models)) for k in ("nll", "tokens")]
    sums = scored.sum(cols)
    out = []
    for i in range(len(models)):
        nll, tokens = float(sums[f"sum(nll_{i})"]), int(sums[f"sum(tokens_{i})"])
        out.append({"perplexity": math.exp(nll / tokens) if tokens else float("nan"),
                    "nll_per_token": nll / max(tokens, 1), "tokens": tokens})
    return out
