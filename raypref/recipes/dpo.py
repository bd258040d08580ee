"""Recipe: DPO / IPO of one LoRA policy on a saved base — its config (`DPOConfig`) and specs.

The runner pickles the spec to each worker; there it loads the base saved by
``models.factory.save_pretrained_safetensors``, adds a fresh LoRA, feeds tokenized DPO pairs
(the experiment picks the data source: pairs in memory, or a Ray Data set streamed to the
workers), scores the reference with the adapter disabled (no second copy of the base) and
exports the adapter as safetensors, ready for ``models.merge``. Used by the preference job
(experiments/preference.py), Personalized Soups and the sweep; `PairSpec` is the base of every
method that learns from preference pairs (ORPO: recipes/orpo.py).

Defaults come from the soups probe in PLATFORM-NOTES: LoRA r8, lr 5e-4, beta 0.5 kept the merged
policies well behaved; lr 2e-3 with beta 0.1 made the "concise" policy degenerate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raypref.algos.dpo import LOSS_TYPES, dpo_loss, implicit_reward_accuracy, sequence_logprobs
from raypref.data.labelling import combination_instruction
from raypref.data.records import PreferenceRecord
from raypref.models.factory import LoraSettings, add_lora, encode_example, load_pretrained, load_tokenizer
from raypref.train.fingerprint import model_identity
from raypref.train.runner import Optimization
from raypref.train.spec import PRIMARY_ROLE, LoopSpec, StepContext

DEFAULT_LR = 5e-4
DEFAULT_BETA = 0.5
POLICY_INFO_FILE = "soup_policy.json"

Batch = dict[str, torch.Tensor]


# What a pair's system message holds (models/chat.py places it; a tokenizer without a chat
# template cannot take one): "" none; "user_text" the pair's user text, if it has one (P-DPO's
# user text; a pair without one gets the template's default); "combination" the instruction of
# the P-Soups combination its user text names (P-MORL; required).
SYSTEM_TEXTS = ("", "user_text", "combination")


def pair_system_text(rule: str, rec: PreferenceRecord, index: int) -> str | None:
    """Pair ``index``'s system text under ``rule`` (one of ``SYSTEM_TEXTS``)."""
    if rule not in SYSTEM_TEXTS:
        raise ValueError(f"system text rule {rule!r}: must be one of {SYSTEM_TEXTS}")
    if not rule or (rule == "user_text" and not rec.user_text):
        return None
    if not rec.user_text:
        raise ValueError(f"pair {index} (prompt {rec.prompt[:40]!r}) has no user_text to take its "
                         f"system message from (system={rule!r})")
    return rec.user_text if rule == "user_text" else combination_instruction(rec.user_text)


def encode_pairs(tokenizer, pairs: Sequence[PreferenceRecord], max_length: int, system: str = "") -> list[tuple]:
    """Per pair: (chosen ids, chosen prompt length, rejected ids, rejected prompt length);
    ``system``: which text each pair's system message holds (``SYSTEM_TEXTS``)."""
    out = []
    for i, rec in enumerate(pairs):
        if not rec.chosen or not rec.rejected:
            raise ValueError(f"pair {i} (prompt {rec.prompt[:40]!r}): empty chosen or rejected response")
        text = pair_system_text(system, rec, i)
        # a pair with earlier turns is asked its conversation (each turn a template turn)
        c_ids, c_prompt = encode_example(tokenizer, rec.prompt_or_context, rec.chosen, max_length, system=text)
        r_ids, r_prompt = encode_example(tokenizer, rec.prompt_or_context, rec.rejected, max_length, system=text)
        out.append((c_ids, c_prompt, r_ids, r_prompt))
    return out


def rank_shard(pairs: Sequence, ctx: StepContext) -> list:
    """This rank's share of the pairs (every world_size-th); it must fill a micro-batch."""
    shard = list(pairs[ctx.rank::ctx.world_size])
    if len(shard) < ctx.micro_batch_size:
        raise ValueError(f"rank {ctx.rank}/{ctx.world_size} holds {len(shard)} pairs, fewer than "
                         f"micro_batch_size={ctx.micro_batch_size}")
    return shard


def epoch_chunks(n: int, size: int, start: int, seed: int) -> Iterator[list[int]]:
    """Endless index chunks of ``size`` over ``n`` items, reshuffled each epoch by (seed, epoch),
    starting at micro-batch ``start`` (so a resumed run continues where it stopped); the ragged
    tail of each epoch is dropped."""
    per_epoch = n // size
    index = start
    while True:
        epoch, offset = divmod(index, per_epoch)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        yield order[offset * size:(offset + 1) * size]
        index += 1


def collate_pairs(encoded: Sequence[tuple], pad_id: int) -> Batch:
    """Right-padded batch ``[chosen..., rejected...]`` so policy and reference each need one forward."""
    seqs = [(e[0], e[1]) for e in encoded] + [(e[2], e[3]) for e in encoded]
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(seqs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels_mask[row, n_prompt : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels_mask": labels_mask}


@contextlib.contextmanager
def reference_mode(model: torch.nn.Module):
    """The reference policy: adapters off, no grad, eval mode (no dropout noise in the reference)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


def dpo_step_outputs(model: torch.nn.Module, batch: Batch, beta: float, loss_type: str = "sigmoid",
                     sft_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen_rewards, rejected_rewards) of a collated batch for a peft policy.

    ``sft_weight`` > 0 adds that times the chosen responses' negative log-likelihood, averaged
    over all their tokens in the batch (trl's ``loss_type=["sigmoid", "sft"]`` with
    ``loss_weights=[1, sft_weight]``; RPO): it holds the policy to the data's text while the
    DPO term moves it along the preference."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    args = (batch["input_ids"], batch["attention_mask"], batch["labels_mask"])
    n = batch["input_ids"].shape[0] // 2
    logps = sequence_logprobs(model, *args)
    with reference_mode(model):
        ref = sequence_logprobs(model, *args)
    lengths = batch["labels_mask"].sum(dim=1).float()
    loss, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta, loss_type,
                                      chosen_lengths=lengths[:n], rejected_lengths=lengths[n:])
    if sft_weight:
        loss = loss + sft_weight * (-logps[:n].sum() / lengths[:n].sum().clamp(min=1.0))
    return loss, chosen, rejected


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, tokenizer, pairs: Sequence[PreferenceRecord], beta: float,
                   max_length: int = 128, batch_size: int = 32, system: str = "") -> dict[str, float]:
    """Implicit-reward accuracy and mean margin of a peft policy on (held-out) pairs
    (``system``: the pairs' system text rule, as in `encode_pairs`)."""
    if not pairs:
        raise ValueError("evaluate_pairs needs at least one pair")
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        encoded = encode_pairs(tokenizer, pairs, max_length, system)
        device = next(model.parameters()).device
        for start in range(0, len(encoded), batch_size):
            batch = collate_pairs(encoded[start : start + batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}  # an evaluation worker's GPU
            _, c, r = dpo_step_outputs(model, batch, beta)
            chosen.append(c.cpu())
            rejected.append(r.cpu())
    finally:
        model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"reward_accuracy": implicit_reward_accuracy(c, r), "reward_margin": (c - r).mean().item()}


@dataclass
class DPOConfig(Optimization):
    """DPO / IPO of one LoRA policy on a base (defaults: the soups probe of PLATFORM-NOTES)."""

    lr: float = DEFAULT_LR  # PLATFORM-NOTES probe: 2e-3 with beta 0.1 degenerated
    beta: float = DEFAULT_BETA  # strength of the pull towards the reference
    loss_type: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"
    sft_weight: float = 0.0  # + this × NLL of the chosen responses (trl's "sft" loss term, RPO)
    max_length: int = 128  # tokens per prompt + response
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16))

    def validate(self, where: str = "training") -> None:
        super().validate(where)
        if self.beta <= 0:
            raise ValueError(f"{where}.beta={self.beta!r}: must be > 0")
        if self.sft_weight < 0:
            raise ValueError(f"{where}.sft_weight={self.sft_weight!r}: must be >= 0")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"{where}.loss_type={self.loss_type!r}: must be one of {LOSS_TYPES}")
        if self.max_length < 8:
            raise ValueError(f"{where}.max_length={self.max_length!r}: must be >= 8")
        self.lora.validate(f"{where}.lora")


SHARD_SIDES = ("chosen", "rejected")
SHARD_FIELDS = ("input_ids", "attention_mask", "labels_mask")


def shard_batch_to_pairs(batch: dict[str, torch.Tensor]) -> Batch:
    """A batch of ``data.pipeline.tokenize_pairs`` rows (``chosen_input_ids``, ..., fixed-length)
    in the ``collate_pairs`` layout ``[chosen..., rejected...]``, trimmed to its longest sequence."""
    missing = [f"{s}_{f}" for s in SHARD_SIDES for f in SHARD_FIELDS if f"{s}_{f}" not in batch]
    if missing:
        raise KeyError(f"dataset batch lacks column(s) {missing}; has {sorted(batch)} "
                       "(expected the output of data.pipeline.tokenize_pairs)")
    out = {f: torch.cat([batch[f"{s}_{f}"] for s in SHARD_SIDES]).long() for f in SHARD_FIELDS}
    width = max(1, int(out["attention_mask"].sum(dim=1).max()))  # fixed-length padding costs compute
    return {f: t[:, :width] for f, t in out.items()}


@dataclass
class PairSpec(LoopSpec):
    """A LoRA policy on a saved base trained on preference pairs (picklable). The data source is
    the experiment's choice: ``pairs`` in memory (they travel with the spec), or ``dataset``, the
    name of a Ray Data set of ``data.pipeline.tokenize_pairs`` rows (``run(..., datasets=...)``),
    tokenized in the policy's format (``encode=encode_example``) by the base's tokenizer; then
    ``pairs`` stays empty and ``n_pairs`` records how many pairs the set held. Subclasses give
    the loss (`DPOSpec`, `ORPOSpec`).

    Resume of a streamed set: the spec's state (passes begun, micro-batches consumed in the
    current pass) is saved in every checkpoint; a resumed worker restarts the interrupted pass
    and skips the micro-batches it had consumed, so it continues at its data position. The
    skipped rows are the same ones as before exactly when the shard's row order is reproducible
    (the local shuffle is seeded by the pass; Ray Data's split across several workers may order
    rows differently)."""

    base_dir: str
    pairs: list[PreferenceRecord] = field(default_factory=list)
    name: str = ""  # e.g. the P-Soups preference this policy serves
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16))
    beta: float = DEFAULT_BETA
    max_length: int = 128
    seed: int = 0
    dataset: str = ""  # "" = the in-memory pairs; else the Ray Data set the pairs stream from
    n_pairs: int = 0  # pairs in the dataset (recorded only)
    shuffle_buffer: int = 0  # streamed: rows in iter_torch_batches' local shuffle buffer (0: data order)
    # held-out pairs scored at every evaluation (`eval.heldout_<score>`, e.g. for a sweep's ASHA)
    heldout: list[PreferenceRecord] = field(default_factory=list)
    system: str = ""  # what each pair's system message holds (SYSTEM_TEXTS; "combination": P-MORL)

    @classmethod
    def from_config(cls, cfg: DPOConfig, base_dir: str, pairs: list[PreferenceRecord] | None = None,
                    name: str = "", seed: int = 0, **extra) -> "PairSpec":
        return cls(base_dir=str(base_dir), pairs=list(pairs or []), name=name, lora=cfg.lora, beta=cfg.beta,
                   max_length=cfg.max_length, seed=seed, **{**cls.settings(cfg), **extra})

    @classmethod
    def settings(cls, cfg: DPOConfig) -> dict:
        """The method's own fields, read from its config section."""
        return {}

    def __post_init__(self) -> None:
        if not self.pairs and not self.dataset:
            raise ValueError(f"{type(self).__name__}({self.name!r}): no preference pairs and no dataset")
        if self.beta <= 0:
            raise ValueError(f"{type(self).__name__}.beta={self.beta}: must be > 0")
        if self.system not in SYSTEM_TEXTS:
            raise ValueError(f"{type(self).__name__}.system={self.system!r}: must be one of {SYSTEM_TEXTS}")
        if self.system and self.dataset:
            raise ValueError(f"{type(self).__name__}.system={self.system!r}: streamed pairs are tokenized "
                             "by the Ray Data pipeline, which writes no system message; use pairs in memory")
        self._check_settings()
        self._tokenizer = None  # loaded lazily on each worker, never pickled
        self._passes = 0  # streamed: passes begun over this worker's shard
        self._consumed = 0  # streamed: micro-batches handed out in the current pass

    def _check_settings(self) -> None:
        """The subclass's own checks."""

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base_dir)
        return self._tokenizer

    def build_model(self, role: str = PRIMARY_ROLE) -> torch.nn.Module:
        model, self._tokenizer = load_pretrained(self.base_dir)
        return add_lora(model, self.lora)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "base_dir": model_identity(self.base_dir)}

    def state_dict(self) -> dict:
        return {"passes": self._passes, "consumed": self._consumed} if self.dataset else {}

    def load_state_dict(self, state: dict) -> None:
        if self.dataset:
            self._passes, self._consumed = int(state["passes"]), int(state["consumed"])

    def batches(self, ctx: StepContext) -> Iterator[Batch]:
        return self._streamed_batches(ctx) if self.dataset else self._memory_batches(ctx)

    def _memory_batches(self, ctx: StepContext) -> Iterator[Batch]:
        """Endless, deterministic stream of this rank's micro-batches (a new shuffle each epoch),
        starting after the micro-batches of the steps already done."""
        shard = rank_shard(self.pairs, ctx)
        tokenizer = self.tokenizer()
        encoded = encode_pairs(tokenizer, shard, self.max_length, self.system)
        for chunk in epoch_chunks(len(encoded), ctx.micro_batch_size, ctx.micro_batches_done, self.seed):
            yield collate_pairs([encoded[i] for i in chunk], tokenizer.pad_token_id)

    def _streamed_batches(self, ctx: StepContext) -> Iterator[Batch]:
        """One pass over this worker's dataset shard (the runner starts the next pass)."""
        import ray.train

        shard = ray.train.get_dataset_shard(self.dataset)
        if self._consumed and self._passes:  # resuming inside a pass: replay it up to there
            skip, self._consumed = self._consumed, 0
        else:
            skip, self._passes, self._consumed = 0, self._passes + 1, 0
        shuffle = dict(local_shuffle_buffer_size=self.shuffle_buffer,
                       local_shuffle_seed=self.seed * 1_000_003 + self._passes) if self.shuffle_buffer else {}
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=ctx.micro_batch_size, **shuffle)):
            if i < skip:
                continue
            self._consumed = i + 1
            yield shard_batch_to_pairs(batch)
        self._consumed = 0

    @classmethod
    def score_pairs(cls, model: torch.nn.Module, tokenizer, records: Sequence[PreferenceRecord], section,
                    batch_size: int = 32) -> dict[str, float]:
        """The method's held-out scores of a trained policy (``section``: its beta, max_length)."""
        raise NotImplementedError

    def evaluate(self, ctx: StepContext) -> dict[str, float]:
        if not self.heldout:
            return {}
        scores = self.score_pairs(ctx.model, self.tokenizer(), self.heldout, self)
        return {f"heldout_{k}": v for k, v in scores.items()}

    def export(self, models: dict[str, torch.nn.Module], out_dir: Path) -> None:
        """The adapter (``adapter_model.safetensors`` + config) and which preference / base it belongs to."""
        models[PRIMARY_ROLE].save_pretrained(out_dir, safe_serialization=True)
        (Path(out_dir) / POLICY_INFO_FILE).write_text(json.dumps(self.policy_info(), indent=2))

    def policy_info(self) -> dict:
        """What ``export`` writes beside the adapter (``soup_policy.json``)."""
        info = {"preference": self.name, "sft_dir": str(self.base_dir), "beta": self.beta,
                "lora": dataclasses.asdict(self.lora),
                "n_pairs": self.n_pairs if self.dataset else len(self.pairs)}
        if self.system:
            info["system"] = self.system  # what its system messages held (P-MORL: "combination")
        return {**info, "dataset": self.dataset} if self.dataset else info


@dataclass
class DPOSpec(PairSpec):
    """DPO / IPO. The reference is the base itself (adapters off), so no second copy is held."""

    loss_type: str = "sigmoid"
    sft_weight: float = 0.0

    @classmethod
    def settings(cls, cfg: DPOConfig) -> dict:
        return {"loss_type": cfg.loss_type, "sft_weight": cfg.sft_weight}

    def _check_settings(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPOSpec.loss_type={self.loss_type!r}: must be one of {LOSS_TYPES}")
        if self.sft_weight < 0:
            raise ValueError(f"DPOSpec.sft_weight={self.sft_weight}: must be >= 0")

    @classmethod
    def score_pairs(cls, model, tokenizer, records, section, batch_size: int = 32) -> dict[str, float]:
        """Implicit-reward accuracy and margin (the reference: the base, adapters off)."""
        return evaluate_pairs(model, tokenizer, records, section.beta, max_length=section.max_length,
                              batch_size=batch_size, system=getattr(section, "system", ""))

    def loss(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        loss, chosen, rejected = dpo_step_outputs(ctx.model, batch, self.beta, self.loss_type, self.sft_weight)
        return loss, {
            "reward_accuracy": implicit_reward_accuracy(chosen, rejected),
            "reward_margin": (chosen - rejected).mean().item(),
            "reward_chosen": chosen.mean().item(),
            "reward_rejected": rejected.mean().item(),
        }

    def policy_info(self) -> dict:
        return {**super().policy_info(), "loss_type": self.loss_type, "sft_weight": self.sft_weight}


