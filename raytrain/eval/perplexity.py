"""Perplexity of an exported model on a held-out split, computed where the data lives (Ray Data)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from raytrain import storage
from raytrain.config.schema import JobSpec
from raytrain.errors import StageInputError

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


def default_model_dir(spec: JobSpec) -> str:
    """The pretrained model: perplexity on the corpus's held-out split is a pretraining measure (a chat-tuned
    model's web perplexity says how much of the corpus it forgot; point serve.model_path at it to measure that)."""
    return storage.Layout(spec.storage.root).model(spec.model.name, spec.run_name)


def run_eval(spec: JobSpec, model_dir: str | None = None) -> dict[str, Any]:
    """Measure perplexity on the held-out split; write eval.json next to the model."""

    t0 = time.time()
    layout = storage.Layout(spec.storage.root)
    model_dir = model_dir or spec.serve.model_path or default_model_dir(spec)
    if not storage.exists(storage.join(model_dir, "config.json")):
        raise StageInputError(f"no exported model at {model_dir}: run the pretrain stage first")
    split_dir = storage.join(layout.dataset(spec.data.name), spec.eval.split)
    from raytrain.data.readers import read_prepared

    ds = read_prepared(split_dir, columns=["input_ids", "num_tokens"])
    if spec.eval.max_sequences:
        ds = ds.limit(spec.eval.max_sequences)
    use_gpu = spec.train.use_gpu if spec.eval.use_gpu is None else spec.eval.use_gpu
    hw = {"use_gpu": use_gpu, "replicas": spec.eval.num_replicas, "dtype": spec.train.precision}
    result: dict[str, Any] = {
        "model_dir": model_dir,
        "dataset": spec.data.name,
        "split": spec.eval.split,
        "device": "cuda" if use_gpu else "cpu",
        "replicas": spec.eval.num_replicas,
        **perplexity(ds, model_dir, spec.eval.batch_size, **hw),
    }
    if spec.eval.compare_untrained:
        base = perplexity(ds, model_dir, spec.eval.batch_size, untrained=True, seed=spec.train.seed, **hw)
        result["untrained_perplexity"] = base["perplexity"]
        result["beats_untrained"] = result["perplexity"] < base["perplexity"]
    result["seconds"] = round(time.time() - t0, 1)
    eval_path = storage.join(model_dir, "eval.json")
    earlier = storage.read_json(eval_path) if storage.exists(eval_path) else {}  # e.g. a post-training stage's
    storage.write_json(eval_path, {**earlier, **result})
    log.info("perplexity on %s: %.2f (untrained: %s)", spec.eval.split, result["perplexity"],
             f"{result.get('untrained_perplexity', float('nan')):.2f}")
    return result
