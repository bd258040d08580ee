"""Loop spec: P-DPO / P-IPO (P-RLHF §4.4, §F.3): a LoRA policy and a user model trained jointly.

The policy is a `PersonalizedLM`: the SFT model with a fresh LoRA, and in front of it a user
model whose embeddings are a soft prompt. A pair's user text (``use_user_text``) follows the user
tokens in that soft prompt, or, for a tokenizer with a chat template, is the system message. Each pair is scored twice, with its annotator's id and
with the generic id 0, and the loss mixes the two terms by ``alpha``; the reference is the SFT
model (the LoRA disabled) with no user tokens. ``user_model=None`` is vanilla DPO through the
same code: a uniform user model with no tokens and ``alpha = 1``.

Evaluation (P-RLHF §C.3): the implicit reward ``β·log π_p(y|x,u)/π_ref(y|x)`` ranks each held-out
pair; users seen in training are scored with their own id, every other user with the generic
id 0. Reported: accuracy per user, Accuracy-top (pooled over seen users), Accuracy-generic
(pooled over unseen users) and, given ``groups``, the mean per-user accuracy of each group.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raypref.algos.dpo import LOSS_TYPES
from raypref.algos.pdpo import PDPOOutput, pdpo_loss, response_logprobs
from raypref.data.records import UNKNOWN_USER, PreferenceRecord
from raypref.models.chat import has_chat_template
from raypref.models.factory import LoraSettings, add_lora, load_pretrained, load_tokenizer
from raypref.models.user_model import PersonalizedLM, UserModel, UserModelConfig
from raypref.recipes.dpo import collate_pairs, encode_pairs, epoch_chunks, rank_shard
from raypref.train.spec import PRIMARY_ROLE, LoopSpec, StepContext

INFO_FILE = "pdpo_policy.json"
Batch = dict[str, torch.Tensor]
NO_USER_TOKENS = UserModelConfig(kind="uniform", n_tokens=0)  # vanilla DPO


def collate_user_pairs(tokenizer, pairs: Sequence[PreferenceRecord], encoded: Sequence[tuple],
                       use_user_text: bool) -> Batch:
    """``collate_pairs``' layout ``[chosen..., rejected...]`` plus each row's annotator id and,
    with ``use_user_text``, the tokenized user text (right-padded, with its mask)."""
    batch = collate_pairs(encoded, tokenizer.pad_token_id)
    ids = [rec.user_id for rec in pairs] * 2
    batch["user_ids"] = torch.tensor(ids, dtype=torch.long)
    if use_user_text:
        texts = [tokenizer(rec.user_text or "", add_special_tokens=False)["input_ids"] for rec in pairs] * 2
        width = max(1, max(map(len, texts)))
        batch["text_ids"] = torch.full((len(texts), width), tokenizer.pad_token_id, dtype=torch.long)
        batch["text_mask"] = torch.zeros((len(texts), width), dtype=torch.long)
        for row, text in enumerate(texts):
            batch["text_ids"][row, : len(text)] = torch.tensor(text, dtype=torch.long)
            batch["text_mask"][row, : len(text)] = 1
    return batch


def pdpo_step(model: PersonalizedLM, batch: Batch, beta: float, alpha: float,
              loss_type: str = "sigmoid") -> PDPOOutput:
    """P-DPO outputs of a collated batch: user pass, generic pass (skipped when alpha == 1),
    reference pass (adapter off, no user tokens)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels_mask"]
    text = (batch.get("text_ids"), batch.get("text_mask"))
    users = model.user_model.index(batch["user_ids"].tolist()).to(device)
    n = ids.shape[0] // 2
    own = response_logprobs(model(ids, mask, users, *text), ids, labels)
    generic = None
    if alpha < 1.0:
        generic = response_logprobs(model(ids, mask, torch.zeros_like(users), *text), ids, labels)
    with model.reference() as reference:
        ref = response_logprobs(reference(input_ids=ids, attention_mask=mask).logits, ids, labels)
    lengths = labels.sum(dim=1).float()
    return pdpo_loss(own[:n], own[n:], None if generic is None else generic[:n],
                     None if generic is None else generic[n:], ref[:n], ref[n:], beta, alpha, loss_type,
                     chosen_lengths=lengths[:n], rejected_lengths=lengths[n:])


def accuracy_report(correct: dict[int, list[bool]], seen: set[int], groups: dict[int, str]) -> dict[str, float]:
    """Per-user accuracies (``acc/user_<id>``), Accuracy-top over seen users' pairs, Accuracy-generic
    over unseen users' pairs, and the mean per-user accuracy of each group of seen users."""
    out: dict[str, float] = {}
    pooled: dict[str, list[bool]] = {"acc/top": [], "acc/generic": []}
    per_group: dict[str, list[float]] = defaultdict(list)
    for user, hits in sorted(correct.items()):
        accuracy = sum(hits) / len(hits)
        pooled["acc/top" if user in seen else "acc/generic"] += hits
        if user in seen:
            out[f"acc/user_{user}"] = accuracy
            if user in groups:
                per_group[groups[user]].append(accuracy)
    out.update({name: sum(h) / len(h) for name, h in pooled.items() if h})
    out.update({f"acc/group_{g}": sum(a) / len(a) for g, a in sorted(per_group.items())})
    return out


@dataclass
class PDPOSpec(LoopSpec):
    """P-DPO of a LoRA + user model on a saved SFT base; pairs and held-out pairs travel with it.

    ``groups`` maps user id -> group name (e.g. "longer" / "shorter") for per-group accuracy.
    ``user_lr``: the user model's own peak learning rate (None: the runner's).
    """

    sft_dir: str
    pairs: list[PreferenceRecord]
    eval_pairs: list[PreferenceRecord] = field(default_factory=list)
    user_model: UserModelConfig | None = field(default_factory=UserModelConfig)
    alpha: float = 0.5
    beta: float = 0.5
    loss_type: str = "sigmoid"
    use_user_text: bool = False
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16))
    user_lr: float | None = None
    groups: dict[int, str] = field(default_factory=dict)
    max_length: int = 128
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError("PDPOSpec.pairs: no preference pairs")
        if self.beta <= 0:
            raise ValueError(f"PDPOSpec.beta={self.beta}: must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"PDPOSpec.alpha={self.alpha}: must be in [0, 1]")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"PDPOSpec.loss_type={self.loss_type!r}: must be one of {LOSS_TYPES}")
        if self.user_model is None:
            self.alpha = 1.0  # vanilla DPO: the user and generic terms are the same term
        else:
            self.user_model.validate()
        self._tokenizer = None
        self._encoded = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None, "_encoded": None}

    @property
    def seen_users(self) -> list[int]:
        return sorted({rec.user_id for rec in self.pairs} - {UNKNOWN_USER})

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.sft_dir)
        return self._tokenizer

    def system_text(self) -> str:
        """With ``use_user_text``, a tokenizer with a chat template reads each pair's user text as
        its system message (recipes.dpo.SYSTEM_TEXTS "user_text"); the tiny format has none."""
        return "user_text" if self.use_user_text and has_chat_template(self.tokenizer()) else ""

    def user_text_tokens(self) -> bool:
        """Whether the user text rides in the soft prompt after the user tokens (P-RLHF §4.3's
        explicit text): only where it is not in the system message already."""
        return self.use_user_text and not self.system_text()

    def build_model(self, role: str = PRIMARY_ROLE) -> PersonalizedLM:
        lm, self._tokenizer = load_pretrained(self.sft_dir)
        lm = add_lora(lm, self.lora)
        users = UserModel(self.user_model or NO_USER_TOKENS, lm.get_input_embeddings().embedding_dim,
                          self.seen_users)
        return PersonalizedLM(lm, users)

    def param_groups(self, role: str, model: torch.nn.Module) -> list[dict]:
        lora = [p for p in model.lm.parameters() if p.requires_grad]
        users = [p for p in model.user_model.parameters() if p.requires_grad]
        groups = [{"params": lora}]
        if users:
            groups.append({"params": users} if self.user_lr is None else {"params": users, "lr": self.user_lr})
        return groups

    def batches(self, ctx: StepContext) -> Iterator[Batch]:
        """Endless deterministic stream of this rank's micro-batches (a new shuffle each epoch)."""
        shard = rank_shard(self.pairs, ctx)
        tokenizer = self.tokenizer()
        encoded = encode_pairs(tokenizer, shard, self.max_length, self.system_text())
        for chunk in epoch_chunks(len(shard), ctx.micro_batch_size, ctx.micro_batches_done, ctx.seed):
            yield collate_user_pairs(tokenizer, [shard[i] for i in chunk], [encoded[i] for i in chunk],
                                     self.user_text_tokens())

    def loss(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        out = pdpo_step(ctx.models[PRIMARY_ROLE], batch, self.beta, self.alpha, self.loss_type)
        return out.loss, out.metrics()

    @torch.no_grad()
    def evaluate(self, ctx: StepContext) -> dict[str, float]:
        if not self.eval_pairs:
            return {}
        return self.evaluate_pairs(ctx.models[PRIMARY_ROLE], self.eval_pairs)

    @torch.no_grad()
    def evaluate_pairs(self, model: PersonalizedLM, pairs: Sequence[PreferenceRecord]) -> dict[str, float]:
        """The accuracy report of ``accuracy_report`` on ``pairs``."""
        tokenizer = self.tokenizer()
        was_training = model.training
        model.eval()
        correct: dict[int, list[bool]] = defaultdict(list)
        try:
            for start in range(0, len(pairs), self.eval_batch_size):
                chunk = pairs[start:start + self.eval_batch_size]
                batch = collate_user_pairs(tokenizer, chunk, encode_pairs(tokenizer, chunk, self.max_length,
                                                                          self.system_text()),
                                           self.user_text_tokens())
                out = pdpo_step(model, batch, self.beta, 1.0, self.loss_type)  # the user's own term only
                hits = (out.user_chosen_rewards > out.user_rejected_rewards).tolist()
                for rec, hit in zip(chunk, hits):
                    correct[rec.user_id].append(hit)
        finally:
            model.train(was_training)
        return accuracy_report(correct, set(self.seen_users), self.groups)

    def export(self, models: dict[str, torch.nn.Module], out_dir: Path) -> None:
        """The adapter and the user model side by side, and what they were trained with."""
        models[PRIMARY_ROLE].save(out_dir)
        (Path(out_dir) / INFO_FILE).write_text(json.dumps(self.policy_info(), indent=2))

    def policy_info(self) -> dict:
        return {"sft_dir": str(self.sft_dir), "alpha": self.alpha, "beta": self.beta, "loss_type": self.loss_type,
                "user_model": None if self.user_model is None else dataclasses.asdict(self.user_model),
                "use_user_text": self.use_user_text, "lora": dataclasses.asdict(self.lora),
                "seen_users": self.seen_users, "n_pairs": len(self.pairs)}
