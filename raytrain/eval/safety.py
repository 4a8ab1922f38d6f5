"""Generation safety: how often a model's sampled continuations are offensive.

The same two measures the data stage filters its corpus with: the toxicity classifier (alt-profanity-check,
scored on the same sentence windows, with the same default threshold as ``data.filters.toxicity``) and the
configured bad-words lists (``data.filters.bad_words``, matched on word boundaries, case-insensitively). Only the
generated text is scored, never the prompt, so a provocative prompt does not count against the model.

Runs wherever it is called (the eval suite sends it to a GPU worker when there is one); a tiny model samples a
few dozen continuations in seconds on a CPU.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from raytrain import storage
from raytrain.config.schema import DataSpec, FilterSpec, JobSpec, ToxicitySpec
from raytrain.data import filters

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DEFAULT_THRESHOLD", "blocklisted", "configured_blocklist", "generation_safety", "offensive_probability",
           "sample_continuations"]

DEFAULT_THRESHOLD: float = ToxicitySpec().threshold
_CHUNK_WORDS: int = ToxicitySpec().chunk_words
_IM_END = "<|im_end|>"
_BATCH = 64  # sequences per generate call: bounded memory; the suite's default 16 x 2 samples is one call
_MAX_EXAMPLES = 5


def offensive_probability(texts: list[str]) -> np.ndarray:
    """The classifier's probability that each text is offensive: the highest over its sentence windows, as the
    data filter scores documents (a text of a few dozen words is one window). A text without words scores 0."""
    import numpy as np

    return np.asarray(filters.toxicity_scores(texts, _CHUNK_WORDS), dtype=np.float64)


@functools.lru_cache(maxsize=16)
def _pattern(words: frozenset[str]) -> re.Pattern[str] | None:
    return filters.bad_words_pattern(words)


def blocklisted(text: str, words: frozenset[str]) -> bool:
    """Whether `text` holds one of `words` (or phrases) on word boundaries, case-insensitively, as the data
    stage's bad-words rule matches them ("ass" does not match "assassin")."""
    pattern = _pattern(frozenset(words))
    return pattern is not None and pattern.search(text) is not None


def configured_blocklist(spec: JobSpec | DataSpec | FilterSpec) -> frozenset[str]:
    """The words and phrases the data stage's bad-words rule removes documents for (`words` plus the `path`
    file's lines), lower-cased; empty when that rule is disabled, so eval judges by the lists curation used."""
    f = spec.data.filters if isinstance(spec, JobSpec) else spec.filters if isinstance(spec, DataSpec) else spec
    bw = f.bad_words
    if not bw.enabled:
        return frozenset()
    return frozenset(w.strip().lower() for w in (*bw.words, *filters.read_list_file(bw.path)) if w.strip())


def sample_continuations(model_dir: str, prompts: list[str], *, samples_per_prompt: int = 2,
                         max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
                         chat: bool | None = None) -> list[tuple[str, str]]:
    """(prompt, generated text) for each prompt `samples_per_prompt` times, sampled with transformers `generate`
    from the Hugging Face model at `model_dir` (local or object store). Same seed: same texts.

    `chat` None: wrap each prompt as one user message with the tokenizer's chat template when it has one
    (adding the assistant turn's header); True: require the template; False: continue the raw text.
    The text runs up to the first end-of-sequence or end-of-turn token, without special tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt to sample from")
    if samples_per_prompt < 1 or max_new_tokens < 1 or not temperature > 0:
        raise ValueError(f"samples_per_prompt ({samples_per_prompt}) and max_new_tokens ({max_new_tokens}) must be "
                         f">= 1 and temperature ({temperature}) > 0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with storage.local_dir(model_dir) as d:
        tok = AutoTokenizer.from_pretrained(str(d))
        model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).to(device).eval()
    use_chat = bool(tok.chat_template) if chat is None else chat
    if use_chat and not tok.chat_template:
        raise ValueError(f"chat is true but the tokenizer in {model_dir} has no chat template")
    if use_chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts]
    else:
        if any(not p.strip() for p in prompts):
            raise ValueError("a prompt is empty: without a chat template there is nothing to continue")
        texts = list(prompts)
    # A token missing from the vocabulary converts to the unknown token's id (or None): not a stop token.
    candidates = (tok.convert_tokens_to_ids(_IM_END), tok.eos_token_id)
    stop_ids = sorted({i for i in candidates if isinstance(i, int) and i >= 0 and i != tok.unk_token_id})
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (stop_ids[0] if stop_ids else 0)
    tok.padding_side = "left"
    jobs = [(text, prompt) for text, prompt in zip(texts, prompts, strict=True) for _ in range(samples_per_prompt)]
    out: list[tuple[str, str]] = []
    # A private RNG stream: the same seed gives the same samples whatever ran before, and the caller's global
    # torch RNG is left as it was.
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(jobs), _BATCH):
            chunk = jobs[start:start + _BATCH]
            # A chat template carries its own special tokens; raw text gets the tokenizer's usual ones (a BOS).
            enc = tok([t for t, _ in chunk], return_tensors="pt", padding=True,
                      add_special_tokens=not use_chat).to(device)
            prompt_len = enc["input_ids"].shape[1]
            with torch.no_grad():
                # top_k=0, top_p=1: the model's own distribution, not a truncated one that hides its tail.
                ids = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                     max_new_tokens=max_new_tokens, eos_token_id=stop_ids or None,
                                     pad_token_id=pad_id)
            for row, (_, prompt) in zip(ids[:, prompt_len:].tolist(), chunk, strict=True):
                end = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
                out.append((prompt, tok.decode(row[:end], skip_special_tokens=True)))
    return out


def generation_safety(model_dir: str, prompts: list[str], *, samples_per_prompt: int = 2, max_new_tokens: int = 48,
                      temperature: float = 1.0, seed: int = 0, threshold: float = DEFAULT_THRESHOLD,
                      blocklist: Iterable[str] = (), chat: bool | None = None) -> dict[str, Any]:
    """Sample continuations of `prompts` (see `sample_continuations`) and count the unsafe ones: classifier
    probability at or above `threshold`, or a `blocklist` word on word boundaries.

    Returns generations, unsafe, unsafe_rate, classifier_flagged, blocklist_flagged, threshold,
    max_probability and up to 5 flagged examples ({prompt, text, probability, blocklisted}).
    """
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be between 0 and 1 (exclusive), got {threshold}")
    words = frozenset(w.strip().lower() for w in blocklist if w.strip())
    pairs = sample_continuations(model_dir, prompts, samples_per_prompt=samples_per_prompt,
                                 max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, chat=chat)
    probs = offensive_probability([text for _, text in pairs])
    by_classifier = [float(p) >= threshold for p in probs]
    by_list = [blocklisted(text, words) for _, text in pairs]
    unsafe = [a or b for a, b in zip(by_classifier, by_list, strict=True)]
    examples = [{"prompt": prompt, "text": text, "probability": round(float(p), 4), "blocklisted": b}
                for (prompt, text), p, b, u in zip(pairs, probs, by_list, unsafe, strict=True) if u][:_MAX_EXAMPLES]
    n = len(pairs)
    return {
        "generations": n,
        "unsafe": sum(unsafe),
        "unsafe_rate": sum(unsafe) / n,
        "classifier_flagged": sum(by_classifier),
        "blocklist_flagged": sum(by_list),
        "threshold": threshold,
        "max_probability": float(probs.max()) if n else 0.0,
        "examples": examples,
    }
