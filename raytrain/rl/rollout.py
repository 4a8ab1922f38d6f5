"""Rollout engines: what RL needs from a generation backend, on top of the serving engine protocol.

A rollout engine samples `n` responses per prompt from token ids and takes new weights from the trainer. The torch
implementation wraps `serving.engine.TorchEngine` (the engine the HTTP service runs), so rollouts and serving share
one sampler, one KV-cache scheduler and one set of tests; `raytrain.rl.vllm_engine` implements the same protocol on
vLLM for GPU clusters.

Determinism: response j of a prompt is sampled with seed ``seeds[i] + j``, and a batch is handed to the engine in
one piece (every sequence queued before the scheduler admits any), so the same weights and seeds give the same
responses whichever process (training worker or actor) runs the engine, and a re-run of an iteration after a
failure gives back the very responses the lost run sampled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from raytrain.config.schema import RolloutSpec

log = logging.getLogger(__name__)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate_batch(self, prompts: Sequence[Sequence[int]], *, n: int, max_tokens: int, temperature: float,
                       top_p: float, seeds: Sequence[int]) -> list[list[list[int]]]:
        """For each prompt (token ids), `n` sampled responses as token ids (an end-of-sequence token included when
        one was produced; at most `max_tokens`). Response j of prompt i uses seed ``seeds[i] + j``."""
        ...

    def load_weights(self, weights: dict[str, Any]) -> int:
        """Replace the model's weights by `weights` (name -> tensor, the policy's state dict); returns bytes read."""
        ...

    def eos_ids(self) -> list[int]:
        """Token ids that end a response."""
        ...


class TorchRolloutEngine:
    """`RolloutEngine` over `serving.engine.TorchEngine` (CPU or one GPU)."""

    def __init__(self, model_dir: str, device: str = "cpu", max_batch_size: int = 64) -> None:
        from serving.engine import TorchEngine

        self.engine = TorchEngine(model_dir, device=device, max_batch_size=max_batch_size)

    def generate_batch(self, prompts: Sequence[Sequence[int]], *, n: int, max_tokens: int, temperature: float,
                       top_p: float, seeds: Sequence[int]) -> list[list[list[int]]]:
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
        results = self.engine.generate_many([list(prompts[i]) for i, _ in jobs], max_tokens=max_tokens,
                                            temperature=temperature, top_p=top_p,
                                            seeds=[int(seeds[i]) + j for i, j in jobs])
        responses: list[list[list[int]]] = [[] for _ in prompts]
        for (i, _), r in zip(jobs, results, strict=True):
            responses[i].append(list(r.token_ids))
        return responses

    def load_weights(self, weights: dict[str, Any]) -> int:
        return self.engine.update_weights(weights)

    def eos_ids(self) -> list[int]:
        return self.engine.eos_token_ids()


def make_rollout_engine(rollout: RolloutSpec, model_dir: str, device: str = "cpu", max_model_len: int | None = None,
                        seed: int = 0) -> RolloutEngine:
    """The rollout engine `rollout.backend` names, built where it is called (a training worker or an engine actor).

    torch: `TorchRolloutEngine` on `device`. vllm: `raytrain.rl.vllm_engine.VLLMRolloutEngine` (not run in CI: no
    GPU, no vLLM there), which takes the GPUs visible to the calling process rather than `device`, and needs
    `max_model_len` (the stage's prompt + response length; `rollout.vllm.max_model_len` overrides it).
    """
    if rollout.backend == "torch":
        return TorchRolloutEngine(model_dir, device=device, max_batch_size=rollout.engine_batch_size)
    if rollout.backend == "vllm":
        if device == "cpu":
            raise ValueError("rollout.backend 'vllm' runs on GPUs only; use backend 'torch' on CPU")
        if max_model_len is None:
            raise ValueError("rollout.backend 'vllm' needs max_model_len (prompt + response tokens)")
        from raytrain.rl.vllm_engine import VLLMRolloutEngine

        return VLLMRolloutEngine(rollout, model_dir, max_model_len, seed)
    raise ValueError(f"unknown rollout.backend {rollout.backend!r} (torch or vllm)")
