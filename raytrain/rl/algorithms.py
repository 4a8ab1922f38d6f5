"""The mathematics of PPO and GRPO on token sequences, as plain tensor functions (no models, no distribution).

Conventions: a batch of B sequences of T tokens (prompt then response, right-padded). Position t of the logits
predicts token t+1, so every per-token quantity here is over the T-1 *shifted* positions and ``mask[b, t] = 1`` when
token t+1 of row b is a response token (an action). Shapes are in the comments: ``(B, T-1)``.

References for the conventions users know: KL estimators k1/k3 (Schulman, "Approximating KL divergence", 2020);
GRPO's group-relative advantages and k3 loss term (Shao et al., DeepSeekMath 2024), with Dr. GRPO's option not to
divide by the group std (Liu et al., 2025); PPO with GAE, clipped value loss, a KL penalty in the reward and the
adaptive KL controller (Ziegler et al., 2019; InstructGPT).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def token_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) for every position: logits (B, T, V), ids (B, T) -> (B, T-1), float32."""
    import torch

    logits = logits[:, :-1].float()
    # log_softmax over V, read at the target: gather first, then subtract logsumexp (no (B, T, V) log-prob copy).
    picked = torch.gather(logits, 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the next-token distribution at every shifted position: (B, T, V) -> (B, T-1)."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy: k1 = logp - ref (unbiased, may be
    negative), k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, non-negative, lower variance)."""
    import torch

    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = (ref_logp - logp).clamp(-20.0, 20.0)  # exp() of a large gap would overflow
        return torch.exp(d) - d - 1
    raise ValueError(f"unknown KL estimator {estimator!r} (k1 or k3)")


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each response's score minus its group's mean (divided by the group's std when `scale`).

    scores (N,) ordered group by group (responses 0..G-1 of prompt 0, then prompt 1, ...) -> (N,).
    """
    g = scores.view(-1, group_size)  # (prompts, G)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens of each row.

    rewards, values, mask: (B, T-1), zero outside the mask; the response is one contiguous run of the mask, and the
    value after its last token is 0 (the episode ends). Returns (advantages, returns), zero outside the mask.
    """
    import torch

    adv = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in range(rewards.shape[1] - 1, -1, -1):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(m > 0, delta + gamma * lam * running, running)
        adv[:, t] = running * m
        next_value = torch.where(m > 0, values[:, t], next_value)
    return adv, (adv + values) * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, mean: float, var: float, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std inside the mask (mean/var are over every rank's masked values, computed by the caller)."""
    return (x - mean) * mask / math.sqrt(var + eps)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (to minimise) and whether the clip was active: (B, T-1) each."""
    import torch

    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).float()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip: float) -> torch.Tensor:
    """PPO's clipped value loss per token: 0.5 * max((V - R)^2, (V_clipped - R)^2), (B, T-1)."""
    import torch

    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


class AdaptiveKL:
    """Ziegler et al.'s controller: coef <- coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, coef: float, target: float | None, horizon: int) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        """`kl`: mean KL per response (nats, summed over its tokens) of the `n` responses just scored."""
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])


class RunningMoments:
    """Running mean and variance of scores over every iteration so far (Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, count: float, mean: float, var: float) -> None:
        """Merge a batch of `count` values with this mean and (population) variance."""
        if count <= 0:
            return
        delta = mean - self.mean
        total = self.count + count
        self.mean += delta * count / total
        self.m2 += var * count + delta**2 * self.count * count / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.mean, self.m2 = (float(state[k]) for k in ("count", "mean", "m2"))
