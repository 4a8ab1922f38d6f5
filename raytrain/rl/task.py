"""PPO and GRPO as a task of the shared training loop (`raytrain.train.loop`).

The loop owns DeepSpeed, ZeRO, optimizer steps, checkpoints, resume and metrics; this task owns what RL adds. Its
`batches` generator runs one iteration per prompt batch of the worker's shard:

1. sync: the policy's current weights go to the rollout engines (gathered first under ZeRO-3), timed, bytes counted;
2. (every `eval_every` iterations, and at iteration 0 for the parent's baseline) held-out prompts are sampled and
   scored, and the mean reward (and on the embedded demo, the ground-truth reward) is logged;
3. generate: `n_samples` responses per prompt from the engines, response j of prompt i seeded by (seed, iteration,
   rank, i, j), so a re-run of the iteration samples the same responses;
4. score: reward sources; then the reference's log-probs, and the policy's own (and the critic's values) before any
   update of this iteration;
5. advantages: GRPO's group-normalised scores, or PPO's GAE over KL-penalised per-token rewards;
6. train: the experience is yielded as micro-batches, `ppo_epochs` times; the loop steps the optimizer every
   `grad_accum_steps` of them, so one iteration is `steps_per_iteration` optimizer steps.

Position: iteration k of epoch e is the k-th batch of prompts of the worker's shard (a fixed order). The loop passes
the micro-batches of the epoch already trained (`start`) after a resume; checkpoints fall on iteration boundaries,
so the generator skips whole prompt batches without generating, and the next iteration is exactly the one the lost
run would have done next. Each iteration's prompt ids are written to ``prompts/iter-<k>-rank<r>.json`` (rewritten
identically by a re-run), the audit that no prompt was skipped or repeated.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from raytrain import storage
from raytrain.rl.algorithms import (
    AdaptiveKL,
    RunningMoments,
    entropy,
    gae,
    group_advantages,
    kl_estimate,
    masked_whiten,
    policy_loss,
    token_logps,
    value_loss,
)
from raytrain.rl.roles import ActorRole, LocalRole, RewardScorer, build_role, ground_truth_values

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PROMPT_COLUMNS = ("prompt_ids", "prompt_len", "prompt_text", "ground_truth", "row_id")


def _policy_with_value_cls() -> type:
    import torch

    class PolicyWithValue(torch.nn.Module):
        """PPO's trainable pair in one DeepSpeed engine (one optimizer, one checkpoint): the policy and a critic with
        its own backbone and a one-output token head. ``forward`` returns (logits (B, T, V), values (B, T))."""

        def __init__(self, policy: torch.nn.Module, critic: torch.nn.Module) -> None:
            super().__init__()
            self.policy = policy
            self.critic = critic

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.policy(input_ids=input_ids, attention_mask=attention_mask).logits
            values = self.critic(input_ids=input_ids, attention_mask=attention_mask).logits[..., 0]
            return logits, values.float()

    return PolicyWithValue


def load_critic(path: str, seed: int) -> torch.nn.Module:
    """A token-level value model: the backbone at `path` (the reward model's, when there is one, as OpenRLHF does;
    else the policy's) with a one-output head (the reward model's score head carries over; else a new, seeded one)."""
    import torch
    from transformers import AutoConfig, AutoModelForTokenClassification

    torch.manual_seed(seed)
    with storage.local_dir(path) as d:
        cfg = AutoConfig.from_pretrained(str(d), num_labels=1)
        return AutoModelForTokenClassification.from_pretrained(str(d), config=cfg, dtype=torch.float32)


class RLTrainTask:
    """`TrainTask` for online RL. `config["rl"]` carries the stage's settings (see `raytrain.rl.stage.loop_config`)."""

    columns = PROMPT_COLUMNS
    extremes: tuple[str, ...] = ()
    seeks = True  # batches(..., start=n) skips trained micro-batches itself, without generating them

    def __init__(self, config: dict[str, Any]) -> None:
        t = config["train"]
        self.task = t["task"]
        self.rl = config["rl"]
        self.parent = config["init_from"]
        self.seed = int(t["seed"])
        self.use_gpu = bool(t["use_gpu"])
        self.zero_stage = int(t["zero_stage"])
        self.mbs, self.gas = int(t["micro_batch_size"]), int(t["grad_accum_steps"])
        self.ppo = self.task["algorithm"] == "ppo"
        self.n = int(self.task["n_samples"])
        self.estimator = self.task.get("kl_estimator") or ("k3" if not self.ppo else "k1")
        adaptive = self.task.get("adaptive_kl") or {}
        self.kl_ctl = AdaptiveKL(float(self.task["kl_coef"]), adaptive.get("target") if self.ppo else None,
                                 int(adaptive.get("horizon", 10_000)))
        self.moments = RunningMoments()
        self.rollout = self.rl["rollout"]
        # GRPO with one optimizer step per iteration: the policy that scores the experience is the one that sampled
        # it, so the old log-probs are the new ones detached (ratio 1) and their forward pass is skipped (as TRL does
        # with num_iterations=1).
        self.on_policy_once = (not self.ppo and int(self.task["ppo_epochs"]) == 1
                               and int(self.rl["steps_per_iteration"]) == 1 and not self.rl.get("old_logp_pass"))
        self.engine: Any = None
        self._metrics: dict[str, Any] = {}
        self._timer: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ models and roles

    def build_model(self) -> torch.nn.Module:
        from raytrain.posttrain.tasks import load_causal_lm

        policy = load_causal_lm(self.parent, self.seed)
        if not self.ppo:
            return policy
        return _policy_with_value_cls()(policy, load_critic(self.rl["critic_init"], self.seed))

    def policy_module(self, module: Any) -> Any:
        return module.policy if self.ppo else module

    def export_module(self, module: Any) -> Any:
        """What the Hugging Face export holds: the policy alone (the critic stays in the checkpoint)."""
        return self.policy_module(module)

    def setup(self, engine: Any) -> None:
        import torch.distributed as dist
        from transformers import AutoTokenizer

        self.engine = engine
        self.device = engine.device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        with storage.local_dir(self.parent) as d:
            self.tok = AutoTokenizer.from_pretrained(str(d))
        self.pad = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id)
        handles = self.rl.get("actors")
        if handles:  # split: this worker's share of each actor group
            r = self.rollout
            self.engines = [ActorRole(h, f"rollout engine {i}", int(r["max_engine_restarts"]))
                            for i, h in enumerate(handles["engine"])]
            self.my_engine = self.engines[self.rank % len(self.engines)]
            self.synced_engines = [e for i, e in enumerate(self.engines) if i % self.world == self.rank]
            pick = self.rank % len(handles["reference"])
            self.reference = ActorRole(handles["reference"][pick], f"reference {pick}", int(r["max_engine_restarts"]))
            self.reward = ActorRole(handles["reward"][pick], f"reward {pick}", int(r["max_engine_restarts"]))
        else:  # colocated: every role in this worker
            self.my_engine = LocalRole(build_role("engine", self.rl["engine_kwargs"]))
            self.engines = self.synced_engines = [self.my_engine]
            self.reference = LocalRole(build_role("reference", self.rl["reference_kwargs"]))
            self.reward = LocalRole(build_role("reward", self.rl["reward_kwargs"]))
        self.ground_truth_fn = None
        if self.rl.get("ground_truth_fn"):
            from raytrain.rl.roles import load_function

            self.ground_truth_fn = load_function(self.rl["ground_truth_fn"])

    # ------------------------------------------------------------------------------------------ loop hooks

    def state_dict(self) -> dict[str, Any]:
        return {"rl_kl": self.kl_ctl.state_dict(), "rl_moments": self.moments.state_dict()}

    def load_state_dict(self, client: dict[str, Any]) -> None:
        if "rl_kl" in client:
            self.kl_ctl.load_state_dict(client["rl_kl"])
            self.moments.load_state_dict(client["rl_moments"])

    def report_metrics(self, loop_metrics: dict[str, Any]) -> dict[str, Any]:
        """This iteration's RL figures (called by the loop when it reports, once per iteration); rank 0 also writes
        them with the loop's (`loop_metrics`: loss, KL, clip ratio, entropy …) to ``iterations/iter-<k>.json`` for
        `raytrain rl`'s summary and the benchmark."""
        now = time.perf_counter()
        m = dict(self._metrics)
        if not m:
            return {}
        m["time/train"] = now - self._timer["train_start"]
        m["time/iteration"] = now - self._timer["start"]
        m["train_tokens_per_s"] = m.pop("_train_tokens") / m["time/train"] if m["time/train"] > 0 else 0.0
        for phase in ("generate", "score", "train", "sync", "eval"):
            m[f"share/{phase}"] = m.get(f"time/{phase}", 0.0) / m["time/iteration"]
        if self.rank == 0 and self.rl.get("log_dir"):
            storage.write_json(storage.join(self.rl["log_dir"], "iterations", f"iter-{m['iteration']:06d}.json"),
                               {**loop_metrics, **m})
        return m

    def weight(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["mask"].sum())

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    # ------------------------------------------------------------------------------------------ the iteration

    def batches(self, shard: Any, micro_batch_size: int, epoch: int, start: int = 0
                ) -> Iterator[dict[str, torch.Tensor]]:
        per_rank = int(self.rl["prompts_per_rank"])
        micro_per_iter = int(self.rl["steps_per_iteration"]) * self.gas
        per_epoch = int(self.rl["iterations_per_epoch"])
        it = shard.iter_batches(batch_size=per_rank, batch_format="numpy", drop_last=True)
        for k, prompts in enumerate(it):
            if (k + 1) * micro_per_iter <= start:
                continue  # trained before the checkpoint this run resumed from
            if k * micro_per_iter < start:
                raise RuntimeError(f"resumed mid-iteration (micro-batch {start} of epoch {epoch}): checkpoints must "
                                   "fall on iteration boundaries")
            iteration = epoch * per_epoch + k
            yield from self._iteration(iteration, epoch, prompts)

    def _iteration(self, iteration: int, epoch: int, prompts: dict[str, np.ndarray]
                   ) -> Iterator[dict[str, torch.Tensor]]:
        import torch

        timer: dict[str, float] = {"start": time.perf_counter()}
        sync_s, sync_bytes = self._sync()
        eval_metrics: dict[str, float] = {}
        t = time.perf_counter()
        every = int(self.rl["eval_every"])
        if self.rl.get("eval_set") and (iteration == 0 or (every and iteration % every == 0)):
            eval_metrics = self._evaluate(iteration)
        eval_s = time.perf_counter() - t

        # ---- generate
        t = time.perf_counter()
        lens = prompts["prompt_len"].astype(int)
        prompt_lists = [prompts["prompt_ids"][i, : lens[i]].tolist() for i in range(len(lens))]
        seeds = [self._seed(iteration, i) for i in range(len(prompt_lists))]
        responses = self.my_engine.call(
            "generate_batch", prompt_lists, n=self.n, max_tokens=int(self.rollout["max_new_tokens"]),
            temperature=float(self.rollout["temperature"]), top_p=float(self.rollout["top_p"]), seeds=seeds,
            on_restart=self._resync)
        gen_s = time.perf_counter() - t
        self._log_prompts(iteration, epoch, prompts)

        # ---- score: rewards, reference log-probs, the policy's own log-probs (and values) before this update
        t = time.perf_counter()
        seqs, plen, resp_texts, rendered, texts, truths = [], [], [], [], [], []
        gts = ground_truth_values(prompts["ground_truth"])
        for i, p in enumerate(prompt_lists):
            rendered_prompt = self.tok.decode(p, skip_special_tokens=False)
            for r in responses[i]:
                seqs.append(p + list(r))
                plen.append(len(p))
                resp_texts.append(self.tok.decode(r, skip_special_tokens=True))
                rendered.append(rendered_prompt)
                texts.append(str(prompts["prompt_text"][i]))
                truths.append(gts[i])
        scored = self.reward.call("score", rendered, texts, resp_texts, truths)
        score_s = time.perf_counter() - t
        t = time.perf_counter()
        ref = self.reference.call("logps", seqs)
        exp = self._experience(seqs, plen, ref)
        ref_s = time.perf_counter() - t
        t = time.perf_counter()
        raw = torch.tensor(scored["score"], dtype=torch.float32)
        stats = self._advantages(exp, raw)
        score_s += ref_s + time.perf_counter() - t

        # ---- figures of the rollout, over every rank
        resp_len = torch.tensor([len(s) - p for s, p in zip(seqs, plen, strict=True)], dtype=torch.float64)
        sums = torch.tensor([float(raw.sum()), float((raw.double() ** 2).sum()), float(len(raw)),
                             float(resp_len.sum()), float(exp["attention_mask"].sum()) * self.task["ppo_epochs"],
                             stats["kl_seq_sum"], float(resp_len.max())], dtype=torch.float64, device=self.device)
        gen_max = torch.tensor([gen_s], dtype=torch.float64, device=self.device)
        import torch.distributed as dist

        dist.all_reduce(sums)
        dist.all_reduce(gen_max, op=dist.ReduceOp.MAX)
        s, s2, count, tokens, train_tokens, kl_sum, _ = (float(x) for x in sums.cpu())
        mean = s / count
        if self.ppo:  # the KL controller sees every rank's responses, identically on every rank
            self.kl_ctl.update(kl_sum / count, int(count))
        self._metrics = {
            "iteration": iteration, "samples": int(count), "prompts": int(count) // self.n,
            "reward_mean": mean, "reward_std": max(s2 / count - mean**2, 0.0) ** 0.5,
            "response_length": tokens / count, "kl_coef": self.kl_ctl.coef,
            "gen_tokens_per_s": tokens / float(gen_max[0]) if float(gen_max[0]) > 0 else 0.0,
            "time/sync": sync_s, "sync_bytes": sync_bytes, "time/eval": eval_s, "time/generate": gen_s,
            "time/score": score_s, "_train_tokens": train_tokens, **eval_metrics,
        }
        if not self.on_policy_once:  # KL to the reference per response, of the policy that sampled
            self._metrics["rollout_kl"] = kl_sum / count
        self._timer = {"start": timer["start"], "train_start": time.perf_counter()}
        yield from self._micro_batches(exp, iteration)

    def _seed(self, iteration: int, i: int) -> int:
        return (((self.seed * 1_000_003 + iteration) * 1024 + self.rank) * 4096 + i * self.n) % (2**62)

    # ------------------------------------------------------------------------------------------ weights

    def _policy_state(self) -> tuple[dict[str, Any], Any]:
        """(name -> tensor of the policy's weights, a context that must stay open while they are used)."""
        import contextlib

        module = self.policy_module(self.engine.module)
        ctx: Any = contextlib.nullcontext()
        if self.zero_stage == 3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        return module, ctx

    def _sync(self) -> tuple[float, int]:
        """Send the policy's weights to this worker's engines; (seconds, bytes)."""
        import torch

        t = time.perf_counter()
        module, ctx = self._policy_state()
        sent = 0
        with ctx, torch.no_grad():
            state = {k: v.detach() for k, v in module.state_dict().items()}
            if isinstance(self.my_engine, LocalRole):
                sent = self.my_engine.call("load_weights", state)
            elif self.synced_engines:
                ref = self.synced_engines[0].put({k: v.to("cpu", copy=True) for k, v in state.items()})
                for e in self.synced_engines:
                    sent += e.call("load_weights", ref, on_restart=self._resync)
        return time.perf_counter() - t, int(sent)

    def _resync(self, role: Any) -> None:
        """A restarted engine holds the parent's weights: give it the current ones before the call is retried.

        The policy has not changed since this iteration's sync (generation precedes the update), so the restarted
        engine samples exactly what the lost one would have."""
        import torch

        module, ctx = self._policy_state()
        with ctx, torch.no_grad():
            state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        role.call("load_weights", role.put(state))

    # ------------------------------------------------------------------------------------------ experience

    def _experience(self, seqs: list[list[int]], plen: list[int], ref: list[np.ndarray]) -> dict[str, torch.Tensor]:
        import torch

        n = max(len(s) for s in seqs)
        rows = len(seqs)
        ids = torch.full((rows, n), self.pad, dtype=torch.long)
        attn = torch.zeros((rows, n), dtype=torch.long)
        mask = torch.zeros((rows, n - 1), dtype=torch.float32)  # shifted: token t+1 is an action
        ref_lp = torch.zeros((rows, n - 1), dtype=torch.float32)
        for i, (s, p) in enumerate(zip(seqs, plen, strict=True)):
            ids[i, : len(s)] = torch.as_tensor(s)
            attn[i, : len(s)] = 1
            mask[i, p - 1: len(s) - 1] = 1
            ref_lp[i, : len(s) - 1] = torch.as_tensor(ref[i])
        exp = {"input_ids": ids, "attention_mask": attn, "mask": mask, "ref_logp": ref_lp * mask}
        if self.on_policy_once:
            return exp
        old_lp = torch.zeros_like(ref_lp)
        values = torch.zeros_like(ref_lp) if self.ppo else None
        with torch.no_grad():
            for a in range(0, rows, self.mbs):
                b = slice(a, a + self.mbs)
                out = self.engine.module(input_ids=ids[b].to(self.device), attention_mask=attn[b].to(self.device))
                logits = out[0] if self.ppo else out.logits
                old_lp[b] = token_logps(logits, ids[b].to(self.device)).cpu()
                if values is not None:
                    values[b] = out[1][:, :-1].cpu()  # the value of the state before each action
        exp["old_logp"] = old_lp * mask
        if values is not None:
            exp["old_values"] = values * mask
        return exp

    def _advantages(self, exp: dict[str, torch.Tensor], raw: torch.Tensor) -> dict[str, float]:
        import torch
        import torch.distributed as dist

        clip = float(self.task["reward_clip"])
        mask = exp["mask"]
        if "old_logp" in exp:
            kl_tok = kl_estimate(exp["old_logp"], exp["ref_logp"], self.estimator) * mask  # (N, T-1)
            kl_seq_sum = float(kl_tok.sum())
        else:  # on-policy single update: the update's own `kl` measures it (per token)
            kl_tok, kl_seq_sum = torch.zeros_like(mask), float("nan")
        if not self.ppo:
            adv = group_advantages(raw.clamp(-clip, clip), self.n, bool(self.task["scale_rewards"]))
            exp["advantages"] = adv[:, None] * mask
            return {"kl_seq_sum": kl_seq_sum}
        scores = raw.clone()
        if self.task["normalize_rewards"]:
            # Running moments over every rank's scores of every iteration so far (kept in the checkpoint).
            g = torch.tensor([float(scores.sum()), float((scores.double() ** 2).sum()), float(len(scores))],
                             dtype=torch.float64, device=self.device)
            dist.all_reduce(g)
            c = float(g[2])
            m = float(g[0]) / c
            self.moments.update(c, m, max(float(g[1]) / c - m * m, 0.0))
            scores = scores / self.moments.std
        scores = scores.clamp(-clip, clip)
        rewards = -self.kl_ctl.coef * kl_tok  # the KL penalty on every action ...
        last = (mask * torch.arange(mask.shape[1])[None, :]).argmax(dim=1)  # (N,) index of each response's last action
        rewards[torch.arange(len(last)), last] += scores  # ... and the score on the last one
        adv, returns = gae(rewards, exp["old_values"], mask, float(self.task["gamma"]), float(self.task["lam"]))
        if self.task["whiten_advantages"]:
            g = torch.tensor([float(adv.sum()), float((adv.double() ** 2).sum()), float(mask.sum())],
                             dtype=torch.float64, device=self.device)
            dist.all_reduce(g)
            mean = float(g[0]) / float(g[2])
            adv = masked_whiten(adv, mask, mean, max(float(g[1]) / float(g[2]) - mean * mean, 0.0))
        exp["advantages"], exp["returns"] = adv, returns
        return {"kl_seq_sum": kl_seq_sum}

    def _micro_batches(self, exp: dict[str, torch.Tensor], iteration: int) -> Iterator[dict[str, torch.Tensor]]:
        import torch

        rows = exp["input_ids"].shape[0]
        for epoch in range(int(self.task["ppo_epochs"])):
            if epoch == 0:
                order = torch.arange(rows)
            else:  # later passes in a seeded order, the same on a re-run
                g = torch.Generator().manual_seed(self._seed(iteration, 0) + epoch)
                order = torch.randperm(rows, generator=g)
            for a in range(0, rows, self.mbs):
                idx = order[a:a + self.mbs]
                n = int(exp["attention_mask"][idx].sum(1).max())  # trim to this micro-batch's longest row
                yield {k: (v[idx, :n] if k in ("input_ids", "attention_mask") else v[idx, : n - 1])
                       for k, v in exp.items()}

    # ------------------------------------------------------------------------------------------ the loss

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out[0] if self.ppo else out.logits  # (B, T, V)
        mask = batch["mask"]
        on = mask > 0
        logp = token_logps(logits, batch["input_ids"])  # (B, T-1)
        old = batch["old_logp"] if "old_logp" in batch else logp.detach()
        pg, clipped = policy_loss(logp, old, batch["advantages"], float(self.task["clip_eps"]))
        kl = kl_estimate(logp, batch["ref_logp"], self.estimator)
        ent = entropy(logits.detach()) if not self.task["entropy_coef"] else entropy(logits)
        per_token = pg
        stats = {"policy_loss": pg.detach()[on], "clip_ratio": clipped[on], "kl": kl.detach()[on],
                 "entropy": ent.detach()[on]}
        if not self.ppo and self.kl_ctl.coef > 0:
            per_token = per_token + self.kl_ctl.coef * kl  # GRPO: KL to the reference as a loss term
        if self.ppo:
            vl = value_loss(out[1][:, :-1], batch["old_values"], batch["returns"], float(self.task["value_clip"]))
            per_token = per_token + float(self.task["vf_coef"]) * vl
            stats["value_loss"] = vl.detach()[on]
        if self.task["entropy_coef"]:
            per_token = per_token - float(self.task["entropy_coef"]) * ent
        return (per_token * mask).sum(), stats

    # ------------------------------------------------------------------------------------------ logs and eval

    def _log_prompts(self, iteration: int, epoch: int, prompts: dict[str, np.ndarray]) -> None:
        if not self.rl.get("log_dir"):
            return
        storage.write_json(storage.join(self.rl["log_dir"], "prompts", f"iter-{iteration:06d}-rank{self.rank}.json"),
                           {"iteration": iteration, "epoch": epoch, "rank": self.rank, "pid": os.getpid(),
                            "row_ids": [str(r) for r in prompts["row_id"]]})

    def _evaluate(self, iteration: int) -> dict[str, float]:
        """Held-out prompts (this rank's share): mean reward and, with a ground truth function, its mean."""
        import torch
        import torch.distributed as dist

        share = self.rl["eval_set"][self.rank::self.world]
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        if share:
            res = evaluate_prompts(self.my_engine, self.reward, share, self.rl["eval_sampling"], self.tok,
                                   self.ground_truth_fn, on_restart=self._resync)
            sums += torch.tensor([sum(res["reward"]), sum(res.get("ground_truth", [])), len(res["reward"])],
                                 dtype=torch.float64, device=self.device)
        dist.all_reduce(sums)
        n = max(float(sums[2]), 1.0)
        out = {"eval/reward": float(sums[0]) / n}
        if self.ground_truth_fn is not None:
            out["eval/ground_truth_reward"] = float(sums[1]) / n
        if self.rank == 0:
            log.info("iteration %d held-out: %s", iteration, {k: round(v, 4) for k, v in out.items()})
        return out


def evaluate_prompts(engine: Any, reward: Any, prompts: list[dict[str, Any]], sampling: dict[str, Any], tok: Any,
                     ground_truth_fn: Any = None, on_restart: Any = None) -> dict[str, list[float]]:
    """Sample one response per prompt (seeded per prompt) and score it: ``{"reward": […], "ground_truth": […]}``.

    `prompts`: ``{"ids", "text", "ground_truth", "index"}`` rows; `engine` and `reward`: roles (`LocalRole` or
    `ActorRole`).
    """
    ids = [p["ids"] for p in prompts]
    seeds = [int(sampling["seed"]) * 100_003 + int(p["index"]) for p in prompts]
    out = engine.call("generate_batch", ids, n=1, max_tokens=int(sampling["max_new_tokens"]),
                      temperature=float(sampling["temperature"]), top_p=1.0, seeds=seeds, on_restart=on_restart)
    texts = [tok.decode(r[0], skip_special_tokens=True) for r in out]
    rendered = [tok.decode(i, skip_special_tokens=False) for i in ids]
    truths = [p["ground_truth"] for p in prompts]
    prompt_texts = [p["text"] for p in prompts]
    scored = reward.call("score", rendered, prompt_texts, texts, truths)
    res = {"reward": scored["score"], "responses": texts}
    if ground_truth_fn is not None:
        res["ground_truth"] = [float(v) for v in ground_truth_fn(prompt_texts, texts, ground_truth=truths)]
    return res


def standalone_scorer(kwargs: dict[str, Any]) -> RewardScorer:
    return RewardScorer(**kwargs)
