"""Recipe: DPO / IPO of one LoRA policy on a saved base — its config (`DPOConfig`) and specs.

The runner pickles the spec to each worker; there it loads the base saved by
``models.factory.save_pretrained_safetensors``, adds a fresh LoRA, feeds tokenized DPO pairs
(in memory: `DPOSpec`; streamed from Ray Data: `ShardDPOSpec`), scores the reference with the
adapter disabled (no second copy of the base) and exports the adapter as safetensors, ready for
``models.merge``. Used by the DPO job (experiments/preference.py) and by Personalized Soups.

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
from raypref.data.records import PreferenceRecord
from raypref.models.factory import LoraSettings, add_lora, encode_example, load_pretrained
from raypref.train.fingerprint import model_identity
from raypref.train.runner import Optimization
from raypref.train.spec import PRIMARY_ROLE, LoopSpec, StepContext

DEFAULT_LR = 5e-4
DEFAULT_BETA = 0.5
POLICY_INFO_FILE = "soup_policy.json"

Batch = dict[str, torch.Tensor]


def encode_pairs(tokenizer, pairs: Sequence[PreferenceRecord], max_length: int) -> list[tuple]:
    """Per pair: (chosen ids, chosen prompt length, rejected ids, rejected prompt length)."""
    out = []
    for i, rec in enumerate(pairs):
        if not rec.chosen or not rec.rejected:
            raise ValueError(f"pair {i} (prompt {rec.prompt[:40]!r}): empty chosen or rejected response")
        c_ids, c_prompt = encode_example(tokenizer, rec.prompt, rec.chosen, max_length)
        r_ids, r_prompt = encode_example(tokenizer, rec.prompt, rec.rejected, max_length)
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


@dataclass
class DPOSpec(LoopSpec):
    """DPO of one LoRA policy on a saved base (picklable; in-memory pairs travel with it).
    The reference is the base itself (adapters off), so no second copy is held."""

    base_dir: str
    pairs: list[PreferenceRecord]
    name: str = ""  # e.g. the P-Soups preference this policy serves
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16))
    beta: float = DEFAULT_BETA
    loss_type: str = "sigmoid"
    max_length: int = 128
    seed: int = 0
    sft_weight: float = 0.0

    @classmethod
    def from_config(cls, cfg: DPOConfig, base_dir: str, pairs: list[PreferenceRecord], name: str = "",
                    seed: int = 0, **extra) -> "DPOSpec":
        return cls(base_dir=str(base_dir), pairs=pairs, name=name, lora=cfg.lora, beta=cfg.beta,
                   loss_type=cfg.loss_type, max_length=cfg.max_length, seed=seed,
                   sft_weight=cfg.sft_weight, **extra)

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError(f"DPOSpec({self.name!r}): no preference pairs")
        self._check_settings()

    def _check_settings(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"DPOSpec.beta={self.beta}: must be > 0")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"DPOSpec.loss_type={self.loss_type!r}: must be one of {LOSS_TYPES}")
        if self.sft_weight < 0:
            raise ValueError(f"DPOSpec.sft_weight={self.sft_weight}: must be >= 0")
        self._tokenizer = None  # loaded lazily on each worker, never pickled

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    def tokenizer(self):
        if self._tokenizer is None:
            _, self._tokenizer = load_pretrained(self.base_dir)
        return self._tokenizer

    def build_model(self, role: str = PRIMARY_ROLE) -> torch.nn.Module:
        model, self._tokenizer = load_pretrained(self.base_dir)
        return add_lora(model, self.lora)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "base_dir": model_identity(self.base_dir)}

    def batches(self, ctx: StepContext) -> Iterator[Batch]:
        """Endless, deterministic stream of this rank's micro-batches (a new shuffle each epoch),
        starting after the micro-batches of the steps already done."""
        shard = rank_shard(self.pairs, ctx)
        tokenizer = self.tokenizer()
        encoded = encode_pairs(tokenizer, shard, self.max_length)
        for chunk in epoch_chunks(len(encoded), ctx.micro_batch_size, ctx.micro_batches_done, self.seed):
            yield collate_pairs([encoded[i] for i in chunk], tokenizer.pad_token_id)

    def loss(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        loss, chosen, rejected = dpo_step_outputs(ctx.model, batch, self.beta, self.loss_type, self.sft_weight)
        return loss, {
            "reward_accuracy": implicit_reward_accuracy(chosen, rejected),
            "reward_margin": (chosen - rejected).mean().item(),
            "reward_chosen": chosen.mean().item(),
            "reward_rejected": rejected.mean().item(),
        }

    def export(self, models: dict[str, torch.nn.Module], out_dir: Path) -> None:
        """The adapter (``adapter_model.safetensors`` + config) and which preference / base it belongs to."""
        models[PRIMARY_ROLE].save_pretrained(out_dir, safe_serialization=True)
        (Path(out_dir) / POLICY_INFO_FILE).write_text(json.dumps(self.policy_info(), indent=2))

    def policy_info(self) -> dict:
        """What ``export`` writes beside the adapter (``soup_policy.json``)."""
        return {"preference": self.name, "sft_dir": str(self.base_dir), "beta": self.beta,
                "loss_type": self.loss_type, "sft_weight": self.sft_weight, "lora": dataclasses.asdict(self.lora),
                "n_pairs": len(self.pairs)}


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
class ShardDPOSpec(DPOSpec):
    """DPO whose pairs stream from a Ray Data shard (``run(..., datasets={dataset: ds})``).

    The dataset holds ``data.pipeline.tokenize_pairs`` rows, which must be tokenized in the
    policy's format (``encode=encode_example``) by the base's tokenizer. ``pairs`` stays empty;
    ``n_pairs`` only records how many pairs the dataset held.

    Resume: the spec's state (passes begun, micro-batches consumed in the current pass) is saved
    in every checkpoint; a resumed worker restarts the interrupted pass and skips the
    micro-batches it had consumed, so it continues at its data position. The skipped rows are the
    same ones as before exactly when the shard's row order is reproducible (the local shuffle is
    seeded by the pass; Ray Data's split across several workers may order rows differently).
    """

    pairs: list[PreferenceRecord] = field(default_factory=list)
    dataset: str = "train"
    n_pairs: int = 0
    shuffle_buffer: int = 0  # rows in iter_torch_batches' local shuffle buffer (0: data order)

    def __post_init__(self) -> None:
        self._check_settings()
        self._passes = 0  # passes begun over this worker's shard
        self._consumed = 0  # micro-batches handed out in the current pass

    def state_dict(self) -> dict:
        return {"passes": self._passes, "consumed": self._consumed}

    def load_state_dict(self, state: dict) -> None:
        self._passes, self._consumed = int(state["passes"]), int(state["consumed"])

    def batches(self, ctx: StepContext) -> Iterator[Batch]:
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

    def policy_info(self) -> dict:
        return {**super().policy_info(), "n_pairs": self.n_pairs, "dataset": self.dataset}
