"""PPO/GRPO mathematics (`raytrain.rl.algorithms`) against independent reference computations. No Ray, no models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raytrain.rl import algorithms as A


def test_token_logps_match_log_softmax_at_the_next_token() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    ids = torch.randint(0, 11, (3, 7))
    got = A.token_logps(logits, ids)
    want = torch.log_softmax(logits, -1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(-1)
    assert got.shape == (3, 6)
    torch.testing.assert_close(got, want)


def test_k1_and_k3_estimate_the_true_kl_from_policy_samples() -> None:
    """Monte Carlo over 200k tokens sampled from p: both estimators' means approach KL(p || q); k3 is never < 0."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    true_kl = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[x], q.log()[x]
    k1, k3 = A.kl_estimate(logp, logq, "k1"), A.kl_estimate(logp, logq, "k3")
    assert float(k1.mean()) == pytest.approx(true_kl, abs=0.01)
    assert float(k3.mean()) == pytest.approx(true_kl, abs=0.01)
    assert float(k3.min()) >= 0 and float(k1.min()) < 0
    assert float(k3.var()) < float(k1.var())
    with pytest.raises(ValueError, match="k2"):
        A.kl_estimate(logp, logq, "k2")


def test_group_advantages_are_relative_to_the_group() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0])
    adv = A.group_advantages(scores, 4, scale=False)
    torch.testing.assert_close(adv, torch.tensor([-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0]))
    scaled = A.group_advantages(scores, 4, scale=True)
    std = float(torch.tensor([1.0, 2.0, 3.0, 4.0]).std())
    torch.testing.assert_close(scaled[:4], torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (std + 1e-4))
    assert torch.all(scaled[4:] == 0)  # a group that agrees teaches nothing


def _gae_reference(r: list[float], v: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE over one episode: delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum (gamma lam)^k delta_{t+k}."""
    n = len(r)
    deltas = [r[t] + gamma * (v[t + 1] if t + 1 < n else 0.0) - v[t] for t in range(n)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_the_textbook_sum_on_masked_rows(gamma: float, lam: float) -> None:
    rng = np.random.default_rng(0)
    rows, width = 4, 12
    mask = torch.zeros(rows, width)
    spans = [(2, 9), (0, 12), (5, 6), (3, 10)]
    for i, (a, b) in enumerate(spans):
        mask[i, a:b] = 1
    rewards = torch.tensor(rng.normal(size=(rows, width)), dtype=torch.float32) * mask
    values = torch.tensor(rng.normal(size=(rows, width)), dtype=torch.float32) * mask
    adv, ret = A.gae(rewards, values, mask, gamma, lam)
    for i, (a, b) in enumerate(spans):
        want = _gae_reference(rewards[i, a:b].tolist(), values[i, a:b].tolist(), gamma, lam)
        np.testing.assert_allclose(adv[i, a:b].numpy(), want, rtol=1e-5, atol=1e-5)
        assert torch.all(adv[i, :a] == 0) and torch.all(adv[i, b:] == 0)
        np.testing.assert_allclose(ret[i, a:b].numpy(), np.asarray(want) + values[i, a:b].numpy(), atol=1e-5)


def test_policy_loss_clips_only_where_it_helps_the_objective() -> None:
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))  # ratios
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = A.policy_loss(logp, old, adv, clip_eps=0.2)
    # ratio 1.5, A>0: clipped to 1.2; ratio 1.5, A<0: unclipped -1.5 is the pessimistic one; symmetric below.
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8]))
    assert clipped.tolist() == [1.0, 0.0, 0.0, 1.0]


def test_value_loss_takes_the_pessimistic_of_clipped_and_unclipped() -> None:
    old = torch.tensor([0.0, 0.0])
    new = torch.tensor([1.0, 0.1])
    ret = torch.tensor([1.0, 1.0])
    loss = A.value_loss(new, old, ret, clip=0.2)
    # Row 0 moved past the clip: the clipped value (0.2) is 0.8 from the return, so that loss counts.
    torch.testing.assert_close(loss, torch.tensor([0.5 * 0.8**2, 0.5 * 0.9**2]))


def test_adaptive_kl_moves_the_coefficient_towards_the_target() -> None:
    ctl = A.AdaptiveKL(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, 100)  # twice the target: +20% x 100/1000
    assert ctl.coef == pytest.approx(0.1 * 1.02)
    ctl.update(3.0, 100)
    assert ctl.coef == pytest.approx(0.1 * 1.02 * (1 - 0.02))  # half the target: clipped to -20% x 0.1
    fixed = A.AdaptiveKL(0.1, target=None, horizon=1000)
    fixed.update(100.0, 1000)
    assert fixed.coef == 0.1
    restored = A.AdaptiveKL(0.5, target=6.0, horizon=1000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.coef == ctl.coef


def test_running_moments_equal_the_moments_of_everything_seen() -> None:
    rng = np.random.default_rng(1)
    batches = [rng.normal(loc=i, scale=1 + i, size=50 + 10 * i) for i in range(5)]
    m = A.RunningMoments()
    for b in batches:
        m.update(len(b), float(b.mean()), float(b.var()))
    everything = np.concatenate(batches)
    assert m.mean == pytest.approx(float(everything.mean()))
    assert m.std == pytest.approx(float(everything.std()))
    again = A.RunningMoments()
    again.load_state_dict(m.state_dict())
    assert again.std == m.std and not math.isnan(again.std)
