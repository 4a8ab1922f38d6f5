"""Ground-truth alignment evaluation: sample from each model, score with the demo's hidden rule, estimate KL.

For the embedded alignment demo (``raytrain.posttrain.demo``) the true reward is a program, so a trained policy
can be judged without a reward model or a judge: sample responses to held-out prompts, score them with
``demo.score``, and measure how far the policy drifted from its reference (the SFT model DPO started from) with a
Monte Carlo estimate of KL(model || reference) over the sampled tokens. Reward up at a modest KL is what DPO should
deliver; reward up at a huge KL, or KL up with no reward, is a finding.

Runs on the driver (CPU or one GPU): the demo's tiny models sample 64 prompts x 2 responses in seconds.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any

from raytrain import storage
from raytrain.posttrain.demo import score

if TYPE_CHECKING:
    import torch

__all__ = ["evaluate_alignment", "load_prompts"]

_IM_END = "<|im_end|>"
_BATCH = 64  # sequences per generate call: bounded memory, still one call for the demo's 128 responses


def load_prompts(path: str, max_prompts: int | None = None) -> list[list[dict[str, Any]]]:
    """The message lists of a ``{"prompt": [messages]}`` JSONL file (local path or URI), in file order."""
    prompts = []
    for line in storage.read_bytes(path).decode().splitlines():
        if line.strip():
            prompts.append(json.loads(line)["prompt"])
        if max_prompts is not None and len(prompts) >= max_prompts:
            break
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def _load(path: str, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with storage.local_dir(path) as d:
        tok = AutoTokenizer.from_pretrained(str(d))
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    return model.to(device).eval(), tok


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding: positions count real tokens only, as generate() does, so scoring matches sampling.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _response_logp(model: Any, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Log-probabilities (batch, new tokens) of the tokens after `prompt_len` under `model` (temperature 1)."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    logp = torch.log_softmax(logits[:, prompt_len - 1 : -1].float(), dim=-1)
    return logp.gather(-1, ids[:, prompt_len:, None]).squeeze(-1)


def _sample(model: Any, tok: Any, prompts: list[list[dict[str, Any]]], samples: int, max_new_tokens: int,
            temperature: float, seed: int, device: str, ref: Any | None) -> dict[str, list[float]]:
    """Sample `samples` responses per prompt; per response: reward, sampled log-ratio to `ref`, token count."""
    import torch

    stop_ids = [i for i in {tok.convert_tokens_to_ids(_IM_END), tok.eos_token_id} if i is not None and i >= 0]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    # Each prompt `samples` times, adjacent: one generate call samples them all independently.
    jobs = [(text, msgs[-1]["content"]) for text, msgs in zip(texts, prompts, strict=True) for _ in range(samples)]
    out: dict[str, list[float]] = {"reward": [], "kl": [], "tokens": [], "stopped": []}
    tok.padding_side = "left"
    # A private RNG stream per call: the same seed gives the same samples whatever ran before, and the caller's
    # global torch RNG is left as it was.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.startswith("cuda") else []):
        torch.manual_seed(seed)
        for start in range(0, len(jobs), _BATCH):
            chunk = jobs[start : start + _BATCH]
            enc = tok([t for t, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            prompt_len = enc["input_ids"].shape[1]
            with torch.no_grad():
                # top_k=0, top_p=1: sample from the model's own distribution, which the KL estimate assumes.
                ids = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                     max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id)
            new = ids[:, prompt_len:]  # (batch, new tokens)
            is_stop = torch.isin(new, torch.tensor(stop_ids, device=device))
            # A response runs up to and including its first stop token (a sampled token too), else to the limit.
            first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1), torch.full_like(is_stop[:, 0], -1,
                                                                                           dtype=torch.long))
            lengths = torch.where(first_stop >= 0, first_stop + 1, torch.full_like(first_stop, new.shape[1]))
            resp_mask = torch.arange(new.shape[1], device=device)[None, :] < lengths[:, None]
            mask = torch.cat([enc["attention_mask"], resp_mask.long()], dim=1)
            if ref is not None:
                log_ratio = _response_logp(model, ids, mask, prompt_len) - _response_logp(ref, ids, mask, prompt_len)
                kl = (log_ratio * resp_mask).sum(1).tolist()
            else:
                kl = [0.0] * len(chunk)
            for row, (_, prompt_text) in enumerate(chunk):
                n_text = int(lengths[row]) - (1 if int(first_stop[row]) >= 0 else 0)
                response = tok.decode(new[row, :n_text], skip_special_tokens=True)
                out["reward"].append(score(prompt_text, response))
                out["kl"].append(float(kl[row]))
                out["tokens"].append(float(lengths[row]))
                out["stopped"].append(float(first_stop[row] >= 0))
    return out


def _summary(values: dict[str, list[float]]) -> dict[str, float]:
    n = len(values["reward"])

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    def std(xs: list[float]) -> float:
        m = mean(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0

    r_std, kl_std = std(values["reward"]), std(values["kl"])
    return {"reward_mean": mean(values["reward"]), "reward_std": r_std, "reward_sem": r_std / math.sqrt(n),
            "kl_to_reference": mean(values["kl"]), "kl_sem": kl_std / math.sqrt(n),
            "response_tokens_mean": mean(values["tokens"]), "stopped_fraction": mean(values["stopped"]), "n": n}


def evaluate_alignment(models: dict[str, str], reference: str, prompts_path: str, *, samples_per_prompt: int = 2,
                       max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
                       max_prompts: int | None = None, device: str | None = None) -> dict[str, dict[str, float]]:
    """Reward under the demo's hidden rule and KL to `reference`, for each of `models` and for `reference`.

    `models` maps a name to an exported Hugging Face directory (local or URI) sharing `reference`'s tokenizer.
    Each model samples `samples_per_prompt` responses (ChatML, stopping at ``<|im_end|>`` or EOS, at most
    `max_new_tokens`) to each prompt of `prompts_path` (``{"prompt": [messages]}`` JSONL). Per model:
    ``reward_mean``, ``reward_std``, ``reward_sem``, ``kl_to_reference`` (mean over responses of the summed
    log p_model - log p_ref of the sampled tokens: an unbiased Monte Carlo estimate of KL(model || reference) at
    temperature 1; at other temperatures the same sampled log-ratio of the tempered samples), ``kl_sem``,
    ``response_tokens_mean`` (stop token included), ``stopped_fraction``, ``n`` (responses) and ``seconds``.
    The result for `reference` itself is under ``"reference"`` (KL 0). Same `seed`: same samples, same numbers.
    """
    import torch

    if "reference" in models:
        raise ValueError("'reference' is reserved for the reference model's own result; rename that model")
    if samples_per_prompt < 1 or max_new_tokens < 1:
        raise ValueError("samples_per_prompt and max_new_tokens must be >= 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = load_prompts(prompts_path, max_prompts)
    ref_model, tok = _load(reference, device)
    args = (prompts, samples_per_prompt, max_new_tokens, temperature, seed, device)
    results: dict[str, dict[str, float]] = {}
    t0 = time.time()
    results["reference"] = _summary(_sample(ref_model, tok, *args, ref=None)) | {"seconds": time.time() - t0}
    for name, path in models.items():
        t0 = time.time()
        model, model_tok = _load(path, device)
        # The KL estimate compares token by token: the two models must share one vocabulary.
        if model_tok.get_vocab() != tok.get_vocab():
            raise ValueError(f"model {name!r} ({path}) does not share the reference's tokenizer ({reference})")
        results[name] = _summary(_sample(model, tok, *args, ref=ref_model)) | {"seconds": time.time() - t0}
        del model
    return results
