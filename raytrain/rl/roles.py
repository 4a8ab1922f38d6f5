"""The roles around the policy: reference model, reward sources, rollout engines, and where each one runs.

Each role is a plain class that works in any process. Placement decides the process:

* colocated: every training worker builds its own (``LocalRole``), and calls it directly;
* split: the driver starts one Ray actor per role instance (``RoleActor``), and a worker calls its share through
  ``ActorRole``, which waits out an actor's restart (Ray restarts a dead actor up to ``max_restarts`` times) and
  lets the caller restore the actor's state (the rollout engine's weights) before it retries the call.

Everything that crosses a process boundary is numpy arrays, lists or (for weights) CPU tensors.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_BATCH = 32  # sequences per forward pass of the frozen models


def load_function(name: str) -> Callable[..., Any]:
    """`module:function` -> the function, with an error that says which part is missing."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {name!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {name!r}: module {module_name!r} has no function {attr!r}")
    return fn


def _device(use_gpu: bool) -> str:
    import torch

    return f"cuda:{torch.cuda.current_device()}" if use_gpu and torch.cuda.is_available() else "cpu"


def _padded(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """Right-padded (B, T) ids and attention mask tensors of token lists."""
    import torch

    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        attn[i, : len(s)] = 1
    return ids, attn


class Reference:
    """The frozen reference policy (the RL run's parent): per-token log-probabilities of given sequences."""

    def __init__(self, model_dir: str, use_gpu: bool = False) -> None:
        from raytrain.posttrain.tasks import load_causal_lm

        self.device = _device(use_gpu)
        self.model = load_causal_lm(model_dir, seed=0).to(self.device).eval().requires_grad_(False)
        self.pad = int(self.model.config.pad_token_id or 0)

    def logps(self, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """For each token list, log p(token t+1 | <= t) at t = 0 … len-2 (float32 arrays of len-1)."""
        import torch

        from raytrain.rl.algorithms import token_logps

        out: list[np.ndarray] = []
        for start in range(0, len(seqs), _BATCH):
            chunk = seqs[start:start + _BATCH]
            ids, attn = _padded(chunk, self.pad)
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits
                lp = token_logps(logits, ids.to(self.device)).cpu().numpy()  # (B, T-1)
            out.extend(lp[i, : len(s) - 1].copy() for i, s in enumerate(chunk))
        return out


class RewardScorer:
    """The reward of (prompt, response): a reward model's score and/or rule-based functions, weighted and summed.

    The reward model reads the conversation as its training pairs were rendered: the prompt as the policy saw it
    (chat template with the generation prompt), the response text, then what the template closes an assistant turn
    with. Functions follow TRL's convention: ``fn(prompts, completions, ground_truth=..., **kwargs) -> list[float]``
    with the prompt's text (a chat prompt's last user message) and the response's text.
    """

    def __init__(self, model_dir: str | None = None, model_weight: float = 1.0,
                 functions: Sequence[tuple[str, float]] = (), use_gpu: bool = False) -> None:
        self.functions = [(name, load_function(name), float(w)) for name, w in functions]
        self.model_weight = float(model_weight)
        self.model: Any = None
        if model_dir:
            from transformers import AutoTokenizer

            from raytrain import storage
            from raytrain.posttrain.tasks import load_reward_model

            self.device = _device(use_gpu)
            self.model = load_reward_model(model_dir, seed=0).to(self.device).eval().requires_grad_(False)
            with storage.local_dir(model_dir) as d:
                self.tok = AutoTokenizer.from_pretrained(str(d))
            self.pad = int(self.model.config.pad_token_id)
            self.limit = int(getattr(self.model.config, "max_position_embeddings", 2048))
            self.turn_end = self._turn_end()
        if self.model is None and not self.functions:
            raise ValueError("no reward source: give rl.reward.model or rl.reward.functions")

    def _turn_end(self) -> str:
        """What the reward tokenizer's chat template writes after an assistant message's content."""
        marker = "\u2063RESPONSE\u2063"
        if self.tok.chat_template:
            user = [{"role": "user", "content": "x"}]
            head = self.tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            full = self.tok.apply_chat_template([*user, {"role": "assistant", "content": marker}], tokenize=False)
            if full.startswith(head) and marker in full:
                return full.split(marker, 1)[1]
        return self.tok.eos_token or ""

    def score(self, rendered_prompts: Sequence[str], prompts: Sequence[str], responses: Sequence[str],
              ground_truth: Sequence[Any]) -> dict[str, list[float]]:
        """``{"score": weighted sum, "model": …, "<function name>": …}``, one value per response."""
        parts: dict[str, list[float]] = {}
        total = np.zeros(len(responses), dtype=np.float64)
        if self.model is not None:
            parts["model"] = self._model_scores([p + r + self.turn_end for p, r in zip(rendered_prompts, responses,
                                                                                       strict=True)])
            total += self.model_weight * np.asarray(parts["model"])
        for name, fn, weight in self.functions:
            values = fn(list(prompts), list(responses), ground_truth=list(ground_truth))
            values = list(values) if values is not None else []
            if len(values) != len(responses) or not all(isinstance(v, (int, float)) for v in values):
                raise ValueError(f"reward function {name} returned {str(values)[:80]}: it must return one number "
                                 f"per completion ({len(responses)})")
            parts[name] = [float(v) for v in values]
            total += weight * np.asarray(parts[name], dtype=np.float64)
        parts["score"] = total.tolist()
        return parts

    def _model_scores(self, texts: list[str]) -> list[float]:
        import torch

        batch = self.tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        encoded = [e.ids[-self.limit:] for e in batch]
        out: list[float] = []
        for start in range(0, len(encoded), _BATCH):
            ids, attn = _padded(encoded[start:start + _BATCH], self.pad)
            with torch.no_grad():
                out += self.model(input_ids=ids.to(self.device),
                                  attention_mask=attn.to(self.device)).logits[:, 0].float().cpu().tolist()
        return out


def build_role(kind: str, kwargs: dict[str, Any]) -> Any:
    """One role instance: 'engine' (a rollout engine), 'reference' or 'reward'."""
    if kind == "engine":
        from raytrain.rl.rollout import TorchRolloutEngine

        backend = kwargs.pop("backend", "torch")
        if backend == "vllm":
            from raytrain.rl.vllm_engine import VLLMRolloutEngine

            return VLLMRolloutEngine(**kwargs)
        return TorchRolloutEngine(**kwargs)
    if kind == "reference":
        return Reference(**kwargs)
    if kind == "reward":
        return RewardScorer(**kwargs)
    raise ValueError(f"unknown role {kind!r}")


class RoleActor:
    """A role in its own Ray actor (split placement). `call` runs one of the role's methods."""

    def __init__(self, kind: str, kwargs: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO)
        self.kind = kind
        self.obj = build_role(kind, dict(kwargs))

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)

    def pid(self) -> int:
        return os.getpid()


class LocalRole:
    """A role in this process (colocated placement)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def call(self, method: str, *args: Any, on_restart: Callable[[Any], None] | None = None, **kwargs: Any) -> Any:
        return getattr(self.obj, method)(*args, **kwargs)

    def put(self, value: Any) -> Any:
        return value


class ActorRole:
    """A role in a Ray actor; a call that finds the actor dead waits for Ray to restart it, lets the caller restore
    its state (`on_restart`), and retries: the same call on a restarted actor gives the same answer."""

    def __init__(self, handle: Any, name: str, max_restarts: int, timeout_s: float = 600.0) -> None:
        self.handle, self.name, self.max_restarts, self.timeout_s = handle, name, max_restarts, timeout_s
        self.restarts_seen = 0

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def call(self, method: str, *args: Any, on_restart: Callable[[Any], None] | None = None, **kwargs: Any) -> Any:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        while True:
            try:
                return ray.get(self.handle.call.remote(method, *args, **kwargs))
            except (RayActorError, ActorUnavailableError) as exc:
                if self.restarts_seen >= self.max_restarts:
                    raise RuntimeError(f"{self.name} died {self.restarts_seen + 1} times (rollout.max_engine_restarts="
                                       f"{self.max_restarts}): {exc}") from exc
                self.restarts_seen += 1
                log.warning("%s died during %s (%s); waiting for Ray to restart it", self.name, method,
                            type(exc).__name__)
                self._wait_alive()
                if on_restart is not None:
                    on_restart(self)
                log.warning("%s is back; retrying %s", self.name, method)

    def _wait_alive(self) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError

        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            try:
                ray.get(self.handle.pid.remote(), timeout=30)
                return
            except (RayActorError, ActorUnavailableError, GetTimeoutError):
                time.sleep(1.0)
        raise RuntimeError(f"{self.name} did not come back within {self.timeout_s:.0f}s")


def start_actors(run: str, kind: str, count: int, kwargs: dict[str, Any], num_cpus: float, num_gpus: float,
                 max_restarts: int) -> list[Any]:
    """`count` RoleActors named raytrain-rl-<run>-<kind>-<i>, restarted by Ray when they die."""
    import ray

    cls = ray.remote(RoleActor)
    handles = []
    for i in range(count):
        name = f"raytrain-rl-{run}-{kind}-{i}"
        try:  # a previous attempt of this run left it behind (driver killed): start afresh
            ray.kill(ray.get_actor(name))
        except ValueError:
            pass
        handles.append(cls.options(name=name, num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                   max_task_retries=0).remote(kind, kwargs))
    ray.get([h.pid.remote() for h in handles])  # constructed (model loaded) before training starts
    return handles


def ground_truth_values(column: Sequence[Any]) -> list[Any]:
    """The prepared data's JSON-encoded ground truths, decoded (None where absent)."""
    return [json.loads(v) if isinstance(v, str) and v else None for v in column]
