"""Loop spec: DPO of one Personalized-Soups policy (one preference) as a LoRA on the SFT base.

The runner pickles the spec to each worker; there it loads the SFT model saved by
``models.factory.save_pretrained_safetensors``, adds a fresh LoRA, streams tokenized DPO pairs of
one preference, scores the reference with the adapter disabled (no second copy of the base) and
exports the adapter as safetensors, ready for ``soups.merge``.

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

from raypref.algos.dpo import dpo_loss, implicit_reward_accuracy, sequence_logprobs
from raypref.data.records import PreferenceRecord
from raypref.models.factory import LoraSettings, add_lora, encode_example, load_pretrained
from raypref.train.runner import LoopSpec, RunnerConfig

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


def dpo_step_outputs(model: torch.nn.Module, batch: Batch, beta: float,
                     loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen_rewards, rejected_rewards) of a collated batch for a peft policy."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    args = (batch["input_ids"], batch["attention_mask"], batch["labels_mask"])
    n = batch["input_ids"].shape[0] // 2
    logps = sequence_logprobs(model, *args)
    with reference_mode(model):
        ref = sequence_logprobs(model, *args)
    lengths = batch["labels_mask"].sum(dim=1).float()
    return dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta, loss_type,
                    chosen_lengths=lengths[:n], rejected_lengths=lengths[n:])


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, tokenizer, pairs: Sequence[PreferenceRecord], beta: float,
                   max_length: int = 128, batch_size: int = 32) -> dict[str, float]:
    """Implicit-reward accuracy and mean margin of a peft policy on (held-out) pairs."""
    if not pairs:
        raise ValueError("evaluate_pairs needs at least one pair")
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        encoded = encode_pairs(tokenizer, pairs, max_length)
        for start in range(0, len(encoded), batch_size):
            batch = collate_pairs(encoded[start : start + batch_size], tokenizer.pad_token_id)
            _, c, r = dpo_step_outputs(model, batch, beta)
            chosen.append(c)
            rejected.append(r)
    finally:
        model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"reward_accuracy": implicit_reward_accuracy(c, r), "reward_margin": (c - r).mean().item()}


@dataclass
class SoupDPOSpec(LoopSpec):
    """DPO of one preference's LoRA policy on a saved SFT base (picklable; pairs travel with it).

    ``micro_batch_size`` pairs per micro-batch (2× sequences); ``grad_accum`` must equal the
    runner's, so a resume skips the right number of micro-batches: build the runner config with
    ``runner_config()`` to keep them in step.
    """

    sft_dir: str
    pairs: list[PreferenceRecord]
    preference: str = ""
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16))
    beta: float = DEFAULT_BETA
    loss_type: str = "sigmoid"
    max_length: int = 128
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.pairs:
            raise ValueError(f"SoupDPOSpec({self.preference!r}): no preference pairs")
        self._check_settings()

    def _check_settings(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"SoupDPOSpec.beta={self.beta}: must be > 0")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("SoupDPOSpec.micro_batch_size and grad_accum must be >= 1")
        self._tokenizer = None  # loaded lazily on each worker, never pickled

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tokenizer"] = None
        return state

    def runner_config(self, **overrides) -> RunnerConfig:
        """A RunnerConfig with this spec's batch settings and the DPO default lr (5e-4)."""
        base = {"lr": DEFAULT_LR, "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum,
                "name": f"dpo-{self.preference}" if self.preference else "dpo"}
        return RunnerConfig(**{**base, **overrides})

    def tokenizer(self):
        if self._tokenizer is None:
            _, self._tokenizer = load_pretrained(self.sft_dir)
        return self._tokenizer

    def build_model(self) -> torch.nn.Module:
        model, self._tokenizer = load_pretrained(self.sft_dir)
        return add_lora(model, self.lora)

    def batches(self, rank: int, world_size: int, start_step: int) -> Iterator[Batch]:
        """Endless, deterministic stream of this rank's micro-batches (a new shuffle each epoch)."""
        shard = self.pairs[rank::world_size]
        if len(shard) < self.micro_batch_size:
            raise ValueError(f"rank {rank}/{world_size} holds {len(shard)} pairs, fewer than "
                             f"micro_batch_size={self.micro_batch_size}")
        tokenizer = self.tokenizer()
        encoded = encode_pairs(tokenizer, shard, self.max_length)
        per_epoch = len(encoded) // self.micro_batch_size  # the ragged tail is dropped each epoch
        index = start_step * self.grad_accum  # micro-batches already consumed
        while True:
            epoch, offset = divmod(index, per_epoch)
            order = list(range(len(encoded)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            chunk = order[offset * self.micro_batch_size : (offset + 1) * self.micro_batch_size]
            yield collate_pairs([encoded[i] for i in chunk], tokenizer.pad_token_id)
            index += 1

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, chosen, rejected = dpo_step_outputs(model, batch, self.beta, self.loss_type)
        return loss, {
            "reward_accuracy": implicit_reward_accuracy(chosen, rejected),
            "reward_margin": (chosen - rejected).mean().item(),
            "reward_chosen": chosen.mean().item(),
            "reward_rejected": rejected.mean().item(),
        }

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        """The adapter (``adapter_model.safetensors`` + config) and which preference / base it belongs to."""
        model.save_pretrained(out_dir, safe_serialization=True)
        (Path(out_dir) / POLICY_INFO_FILE).write_text(json.dumps(self.policy_info(), indent=2))

    def policy_info(self) -> dict:
        """What ``export`` writes beside the adapter (``soup_policy.json``)."""
        return {"preference": self.preference, "sft_dir": str(self.sft_dir), "beta": self.beta,
                "loss_type": self.loss_type, "lora": dataclasses.asdict(self.lora), "n_pairs": len(self.pairs)}


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
class ShardDPOSpec(SoupDPOSpec):
    """DPO whose pairs stream from a Ray Data shard (``run(..., datasets={dataset: ds})``).

    The dataset holds ``data.pipeline.tokenize_pairs`` rows, which must be tokenized in the
    policy's format (``encode=encode_example``) by the SFT tokenizer. ``pairs`` stays empty;
    ``n_pairs`` only records how many pairs the dataset held. Batches are not replayed exactly
    after a resume: a restarted worker begins a new pass over its shard.
    """

    pairs: list[PreferenceRecord] = field(default_factory=list)
    dataset: str = "train"
    n_pairs: int = 0
    shuffle_buffer: int = 0  # rows in iter_torch_batches' local shuffle buffer (0: data order)

    def __post_init__(self) -> None:
        self._check_settings()
        self._tokenizer = None
        self._passes = 0

    def batches(self, rank: int, world_size: int, start_step: int) -> Iterator[Batch]:
        """One pass over this worker's dataset shard (the runner starts the next pass)."""
        import ray.train

        self._passes += 1
        shard = ray.train.get_dataset_shard(self.dataset)
        shuffle = dict(local_shuffle_buffer_size=self.shuffle_buffer,
                       local_shuffle_seed=self.seed * 1_000_003 + self._passes) if self.shuffle_buffer else {}
        for batch in shard.iter_torch_batches(batch_size=self.micro_batch_size, **shuffle):
            yield shard_batch_to_pairs(batch)

    def policy_info(self) -> dict:
        return {**super().policy_info(), "n_pairs": self.n_pairs, "dataset": self.dataset}
