"""Reward-model win rate: the candidate's and a baseline's responses to held-out prompts, judged by a reward model.

Each model samples responses to the same prompts (ChatML through the model's chat template, stopping at
``<|im_end|>`` or EOS); the reward model (a one-label sequence classifier, as the reward stage exports it) scores
each conversation rendered exactly as its training pairs were (the chat template of prompt + assistant turn), and
response k of the candidate meets response k of the baseline on the same prompt: a win when the candidate's
reward is higher, half a win on a tie. Runs where it is called (the eval stage sends it to the cluster as one Ray
task).
"""

from __future__ import annotations

import math
from typing import Any

from raytrain import storage

__all__ = ["reward_scores", "sample_responses", "win_rate"]

_IM_END = "<|im_end|>"
_BATCH = 64  # sequences per generate / scoring call


def _load_lm(path: str, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with storage.local_dir(path) as d:
        tok = AutoTokenizer.from_pretrained(str(d))
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    return model.to(device).eval(), tok


def sample_responses(model_dir: str, prompts: list[list[dict[str, Any]]], *, samples_per_prompt: int = 2,
                     max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
                     device: str = "cpu") -> list[list[str]]:
    """`samples_per_prompt` sampled responses (text, stop token excluded) for each prompt, in prompt order."""
    import torch

    model, tok = _load_lm(model_dir, device)
    if not tok.chat_template:
        raise ValueError(f"{model_dir}: the tokenizer has no chat template; win rate compares chat models")
    stop_ids = [i for i in {tok.convert_tokens_to_ids(_IM_END), tok.eos_token_id} if i is not None and i >= 0]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    jobs = [t for t in texts for _ in range(samples_per_prompt)]
    tok.padding_side = "left"
    out: list[str] = []
    # A private RNG stream: the same seed gives the same responses whatever ran before.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.startswith("cuda") else []):
        torch.manual_seed(seed)
        for start in range(0, len(jobs), _BATCH):
            enc = tok(jobs[start:start + _BATCH], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(device)
            with torch.no_grad():
                ids = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                     max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id)
            for row in ids[:, enc["input_ids"].shape[1]:].tolist():  # (new tokens,) per response
                cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
                out.append(tok.decode(row[:cut], skip_special_tokens=True))
    return [out[i * samples_per_prompt:(i + 1) * samples_per_prompt] for i in range(len(prompts))]


def reward_scores(reward_dir: str, prompts: list[list[dict[str, Any]]], responses: list[list[str]], *,
                  device: str = "cpu", max_length: int | None = None) -> list[list[float]]:
    """The reward model's score of each (prompt, response) conversation; same shape as `responses`."""
    import torch
    from transformers import AutoTokenizer

    from raytrain.posttrain.tasks import load_reward_model

    model = load_reward_model(reward_dir, seed=0).to(device).eval()
    with storage.local_dir(reward_dir) as d:
        tok = AutoTokenizer.from_pretrained(str(d))
    pad_id = int(model.config.pad_token_id)
    limit = max_length or int(getattr(model.config, "max_position_embeddings", 2048))
    texts = [tok.apply_chat_template([*p, {"role": "assistant", "content": r}], tokenize=False)
             for p, rs in zip(prompts, responses, strict=True) for r in rs]
    # Rendered like the training pairs: no special tokens added, the prompt's start cut if too long.
    encoded = [e.ids[-limit:] for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    flat: list[float] = []
    for start in range(0, len(encoded), _BATCH):
        chunk = encoded[start:start + _BATCH]
        n = max(len(e) for e in chunk)
        # Right padding with the model's pad id: the classifier pools at the last token that is not it.
        ids = torch.tensor([e + [pad_id] * (n - len(e)) for e in chunk], device=device)  # (batch, n)
        attn = torch.tensor([[1] * len(e) + [0] * (n - len(e)) for e in chunk], device=device)
        with torch.no_grad():
            flat += model(input_ids=ids, attention_mask=attn).logits[:, 0].float().cpu().tolist()
    it = iter(flat)
    return [[next(it) for _ in rs] for rs in responses]


def win_rate(candidate: str, baseline: str, reward_model: str, prompts: list[list[dict[str, Any]]], *,
             samples_per_prompt: int = 2, max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
             device: str = "cpu") -> dict[str, Any]:
    """``{win_rate, wins, ties, n, candidate_reward_mean, baseline_reward_mean, win_rate_sem, examples}``."""
    kw = {"samples_per_prompt": samples_per_prompt, "max_new_tokens": max_new_tokens, "temperature": temperature,
          "seed": seed, "device": device}
    cand = sample_responses(candidate, prompts, **kw)
    base = sample_responses(baseline, prompts, **kw)
    r_cand = reward_scores(reward_model, prompts, cand, device=device)
    r_base = reward_scores(reward_model, prompts, base, device=device)
    pairs = [(c, b) for cs, bs in zip(r_cand, r_base, strict=True) for c, b in zip(cs, bs, strict=True)]
    wins = sum(c > b for c, b in pairs)
    ties = sum(c == b for c, b in pairs)
    n = len(pairs)
    rate = (wins + 0.5 * ties) / n
    return {"win_rate": rate, "wins": wins, "ties": ties, "n": n,
            "win_rate_sem": math.sqrt(rate * (1 - rate) / n),
            "candidate_reward_mean": sum(c for c, _ in pairs) / n,
            "baseline_reward_mean": sum(b for _, b in pairs) / n,
            "examples": [{"prompt": prompts[i][-1]["content"], "candidate": cand[i][0], "baseline": base[i][0],
                          "candidate_reward": r_cand[i][0], "baseline_reward": r_base[i][0]}
                         for i in range(min(3, len(prompts)))]}
