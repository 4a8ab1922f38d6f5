"""Post-training tasks on the shared loop: SFT, a Bradley-Terry reward model, and DPO/IPO.

Each task implements `raytrain.train.task.TrainTask`: the model it builds from its parent export, the columns it
reads from the prepared Parquet (``raytrain.posttrain.data``), how it batches them, the weight of a micro-batch
(tokens for SFT, pairs for reward and DPO) and a loss returned as a *sum* over that weight, so the loop can weight
micro-batches and ranks exactly (``raytrain.train.loop``). DeepSpeed, ZeRO, resume, checkpoints and export are
the loop's, unchanged.

Conventions of the prepared data: ``*_ids`` are right-padded token rows, ``*_mask[t] = 1`` when token ``t`` is a
prediction target (a response token), ``*_len`` the real length. Batches are trimmed to their longest real row,
so a batch of short examples does not pay for ``max_length``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

SFT_COLUMNS = ("input_ids", "loss_mask", "num_tokens")
PAIR_COLUMNS = ("chosen_ids", "chosen_mask", "chosen_len", "rejected_ids", "rejected_mask", "rejected_len")
REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


def load_causal_lm(path: str, seed: int) -> torch.nn.Module:
    import torch
    from transformers import AutoModelForCausalLM

    from raytrain.storage import local_dir

    torch.manual_seed(seed)
    with local_dir(path) as d:
        return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)


def with_lora(model: Any, lora: dict[str, Any] | None, seed: int, activation_checkpointing: bool) -> Any:
    """Wrap `model` in LoRA adapters (peft) when the task asks for them; the base weights are frozen."""
    if not lora:
        return model
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # adapter init (A random, B zero) identical on every rank
    if activation_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input with frozen embeddings
    cfg = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                     target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _iter(shard: Any, columns: tuple[str, ...], micro_batch_size: int, seed: int, epoch: int,
          shuffle_buffer: int) -> Iterator[dict[str, torch.Tensor]]:
    import torch

    shuffle = {"local_shuffle_buffer_size": shuffle_buffer, "local_shuffle_seed": seed * 1000 + epoch} \
        if shuffle_buffer else {}
    dtypes = {c: (torch.float32 if c.startswith("ref_") else torch.long) for c in columns}
    for batch in shard.iter_torch_batches(batch_size=micro_batch_size, drop_last=True, device="cpu", dtypes=dtypes,
                                          **shuffle):
        yield {c: batch[c] for c in columns}


def _trim(ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    n = int(lengths.max())
    return ids[:, :n], mask[:, :n]


def sequence_logps(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(target) over each row's masked targets, number of targets); logits (B, T, V), ids/mask (B, T)."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V): position t predicts token t+1
    target = ids[:, 1:]
    m = mask[:, 1:].to(logp.dtype)  # (B, T-1)
    tok = torch.gather(logp, 2, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (tok * m).sum(-1), m.sum(-1)


def _pad_cat(a: torch.Tensor, b: torch.Tensor, pad: int) -> torch.Tensor:
    """Stack two (B, Ta) and (B, Tb) batches into (2B, max(Ta, Tb)), right-padding with `pad`."""
    import torch

    n = max(a.shape[1], b.shape[1])
    a = torch.nn.functional.pad(a, (0, n - a.shape[1]), value=pad)
    b = torch.nn.functional.pad(b, (0, n - b.shape[1]), value=pad)
    return torch.cat([a, b])


def pair_batch(batch: dict[str, torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows in one (2B, T) batch: ids, attention mask, loss mask."""
    import torch

    cid, cm = _trim(batch["chosen_ids"], batch["chosen_mask"], batch["chosen_len"])
    rid, rm = _trim(batch["rejected_ids"], batch["rejected_mask"], batch["rejected_len"])
    ids = _pad_cat(cid, rid, pad_id)
    loss_mask = _pad_cat(cm, rm, 0)
    lengths = torch.cat([batch["chosen_len"], batch["rejected_len"]])
    attn = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).long()
    # The model's own pad id after each row's end: a sequence classifier pools at the last token that is not it.
    ids = ids.masked_fill(attn == 0, pad_id)
    return ids, attn, loss_mask


class _PostTrainTask:
    """What the three tasks share: where they start from, their seeds, data order and defaults."""

    extremes: tuple[str, ...] = ()

    def __init__(self, task: dict[str, Any], parent: str, seed: int, shuffle_buffer: int,
                 activation_checkpointing: bool = False) -> None:
        self.task, self.parent, self.seed = task, parent, seed
        self.shuffle_buffer = shuffle_buffer
        self.activation_checkpointing = activation_checkpointing
        self.pad_id = 0

    def setup(self, engine: Any) -> None:
        pass


class SFTTask(_PostTrainTask):
    """Cross-entropy on the response tokens of demonstrations; weight = response tokens."""

    columns = SFT_COLUMNS

    def build_model(self) -> torch.nn.Module:
        model = load_causal_lm(self.parent, self.seed)
        return with_lora(model, self.task.get("lora"), self.seed, self.activation_checkpointing)

    def batches(self, shard: Any, micro_batch_size: int, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        import torch

        for b in _iter(shard, self.columns, micro_batch_size, self.seed, epoch, self.shuffle_buffer):
            n = int(b["num_tokens"].max())
            ids, loss_mask = b["input_ids"][:, :n], b["loss_mask"][:, :n]
            attn = (torch.arange(n)[None, :] < b["num_tokens"][:, None]).long()
            if not self.task.get("assistant_only_loss", True):
                loss_mask = attn
            yield {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}

    def weight(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["loss_mask"][:, 1:].sum())

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        logp_sum, _ = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
        return -logp_sum.sum(), {}


class RewardTask(_PostTrainTask):
    """Bradley-Terry on (chosen, rejected): loss = -log sigmoid(r_c - r_r - margin); weight = pairs."""

    columns = PAIR_COLUMNS
    extremes = ("reward",)

    def build_model(self) -> torch.nn.Module:
        model = load_reward_model(self.parent, self.seed)
        self.pad_id = int(model.config.pad_token_id)
        return model

    def batches(self, shard: Any, micro_batch_size: int, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        for b in _iter(shard, self.columns, micro_batch_size, self.seed, epoch, self.shuffle_buffer):
            ids, attn, _ = pair_batch(b, self.pad_id)
            yield {"input_ids": ids, "attention_mask": attn}

    def weight(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["input_ids"].shape[0] // 2)

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import torch.nn.functional as F

        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
        rc, rr = rewards.chunk(2)
        margin = rc - rr
        losses = -F.logsigmoid(margin - self.task.get("margin", 0.0))
        stats = {"accuracy": (margin > 0).float(), "margin": margin, "reward": rewards,
                 "reward_chosen": rc, "reward_rejected": rr}
        return losses.sum(), {k: v.detach() for k, v in stats.items()}


def load_reward_model(parent: str, seed: int) -> torch.nn.Module:
    """A one-output sequence classifier on the parent's backbone (the score head is new, seeded)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from raytrain.storage import local_dir

    torch.manual_seed(seed)
    with local_dir(parent) as d:
        cfg = AutoConfig.from_pretrained(str(d), num_labels=1)
        if cfg.pad_token_id is None:
            raise ValueError(f"{parent}: config has no pad_token_id; the reward model finds each row's end by it")
        return AutoModelForSequenceClassification.from_pretrained(str(d), config=cfg, dtype=torch.float32)


class DPOTask(_PostTrainTask):
    """DPO's sigmoid loss or IPO against a reference: precomputed log-probs in the batch, or a frozen model."""

    def __init__(self, task: dict[str, Any], parent: str, seed: int, shuffle_buffer: int,
                 activation_checkpointing: bool = False) -> None:
        super().__init__(task, parent, seed, shuffle_buffer, activation_checkpointing)
        self.precomputed = task.get("reference", "precomputed") == "precomputed"
        self.columns = PAIR_COLUMNS + (REF_COLUMNS if self.precomputed else ())
        self.reference: Any = None

    def build_model(self) -> torch.nn.Module:
        model = load_causal_lm(self.parent, self.seed)
        self.pad_id = int(model.config.pad_token_id or 0)
        return with_lora(model, self.task.get("lora"), self.seed, self.activation_checkpointing)

    def setup(self, engine: Any) -> None:
        """Load the frozen reference next to the policy (reference: model); LoRA reuses the base weights."""
        if self.precomputed or self.task.get("lora"):
            return
        ref = load_causal_lm(self.parent, self.seed).to(engine.device)
        ref.eval()
        ref.requires_grad_(False)
        self.reference = ref

    def batches(self, shard: Any, micro_batch_size: int, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        for b in _iter(shard, self.columns, micro_batch_size, self.seed, epoch, self.shuffle_buffer):
            ids, attn, loss_mask = pair_batch(b, self.pad_id)
            out = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}
            if self.precomputed:
                out["ref_logp"] = _cat(b["ref_chosen_logp"], b["ref_rejected_logp"])
            yield out

    def weight(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["input_ids"].shape[0] // 2)

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def _reference_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch

        if self.precomputed:
            return batch["ref_logp"]
        with torch.no_grad():
            if self.reference is not None:
                logits = self.reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:  # LoRA: the reference is the policy with its adapters switched off
                peft_model = getattr(model, "module", model)
                with peft_model.disable_adapter():
                    logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return sequence_logps(logits, batch["input_ids"], batch["loss_mask"])[0]

    def loss(self, model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import torch.nn.functional as F

        ref = self._reference_logps(model, batch)  # (2B,)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, n_tok = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])  # (2B,), (2B,)
        beta = float(self.task.get("beta", 0.1))
        pc, pr = logps.chunk(2)
        rc, rr = ref.chunk(2)
        if self.task.get("loss_type", "sigmoid") == "ipo":
            # IPO regresses the length-normalised log-ratio gap onto 1/(2 tau).
            nc, nr = n_tok.clamp(min=1).chunk(2)
            gap = (pc - rc) / nc - (pr - rr) / nr
            losses = (gap - 1 / (2 * beta)) ** 2
        else:
            z = beta * ((pc - rc) - (pr - rr))
            ls = float(self.task.get("label_smoothing", 0.0))
            losses = -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
        chosen_r, rejected_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        stats = {"rewards/chosen": chosen_r, "rewards/rejected": rejected_r, "rewards/margins": chosen_r - rejected_r,
                 "rewards/accuracies": (chosen_r > rejected_r).float(), "logps/chosen": pc.detach(),
                 "logps/rejected": pr.detach()}
        return losses.sum(), stats


def _cat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([a.float(), b.float()])


def build_posttrain_task(config: dict[str, Any]) -> Any:
    t = config["train"]
    task = t["task"]
    cls = {"sft": SFTTask, "reward": RewardTask, "dpo": DPOTask}[task["type"]]
    return cls(task, config["init_from"], seed=t["seed"], shuffle_buffer=t["shuffle_buffer"],
               activation_checkpointing=bool(t.get("activation_checkpointing")))
