"""Recipe: SFT warm start, a policy fine-tuned on the simulated world's (prompt, response) corpus.

`train_sft` caches its output by the hash of its config: the same config returns the saved
folder at once, any change trains again.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from raypref.algos.sft import response_mask, sft_loss
from raypref.config import config_hash, to_dict
from raypref.data.loaders import load_sft_examples, source_digest
from raypref.data.records import render_context
from raypref.models.factory import (SPECIAL_TOKENS, ModelConfig, add_lora, build_policy, build_tokenizer,
                                    encode_example, write_dir_atomically)
from raypref.train.runner import Optimization, Resources, run, runner_config
from raypref.train.spec import PRIMARY_ROLE, LoopSpec, StepContext

METRICS_FILE = "metrics.json"  # per-step training metrics, beside the weights
CONFIG_FILE = "sft_config.json"


def _default_training() -> Optimization:
    return Optimization(steps=300, micro_batch_size=16, lr=2e-3, warmup_steps=20)


def _default_resources() -> Resources:
    return Resources(num_workers=1, zero_stage=0, checkpoint_every=100)


@dataclass
class SFTConfig:
    """Supervised warm start on the simulated world. Defaults: tiny GPT-2, ~2 min on 2 cores."""

    model: ModelConfig = field(default_factory=ModelConfig)
    training: Optimization = field(default_factory=_default_training)
    resources: Resources = field(default_factory=_default_resources)
    world_seed: int = 0
    difficulty: float = 0.0  # World difficulty in [0, 1]
    # the sassy / sarcastic styles (P3C / P3D, P-Soups §B.2) in the world, its corpus and vocabulary
    extra_styles: bool = False
    corpus_size: int = 4000  # (prompt, response) pairs drawn from the world
    corpus_seed: int = 0
    max_length: int = 192  # tokens per example (prompt + response + eos)
    output_dir: str = "outputs/sft"  # cache root: <output_dir>/sft-<config hash>/
    # your own examples instead of the world's corpus: a .jsonl / .parquet file or folder, a
    # save_to_disk folder or a hub name, of prompt / response (or messages) rows; bad rows go to
    # <output_dir>/quarantine/sft-<config hash>.jsonl
    data: str = ""
    data_split: str = ""  # split of a hub dataset or saved DatasetDict ("" = its only one)
    max_quarantine_fraction: float = 0.05  # of data's rows; more bad rows stop the job

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.corpus_size < 1:
            raise ValueError(f"SFTConfig.corpus_size={self.corpus_size}: must be >= 1")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ValueError(f"SFTConfig.difficulty={self.difficulty}: must be in [0, 1]")
        if self.model.name_or_path == "tiny" and self.max_length > self.model.n_positions:
            raise ValueError(f"SFTConfig.max_length={self.max_length} exceeds "
                             f"model.n_positions={self.model.n_positions}")
        if self.max_length < 8:
            raise ValueError(f"SFTConfig.max_length={self.max_length}: must be >= 8")
        if not 0.0 <= self.max_quarantine_fraction <= 1.0:
            raise ValueError(f"SFTConfig.max_quarantine_fraction={self.max_quarantine_fraction}: must be in [0, 1]")
        self.model.validate()
        self.training.validate("training")
        self.resources.validate("resources")


def sft_world(cfg: SFTConfig):
    """The simulated world the SFT corpus is drawn from (and that judges its policies)."""
    from raypref.data.world import World

    return World.from_config(cfg)


def sft_cache_key(cfg: SFTConfig) -> str:
    """Hash of everything that changes the trained weights (not where they are written)."""
    data = to_dict(cfg)
    data.pop("output_dir")
    if not data["extra_styles"]:  # keeps the keys (and caches) of the six-preference world
        data.pop("extra_styles")
    for key in ("max_failures", "checkpoint_every", "eval_every"):  # how it runs, not what it learns
        data["resources"].pop(key)
    if cfg.data:  # what the examples hold, not where they lie; no keys added without own data
        data["data"] = source_digest(cfg.data)
    else:
        for key in ("data", "data_split", "max_quarantine_fraction"):
            data.pop(key)
    return config_hash(data)


def sft_corpus(cfg: SFTConfig, world) -> list[tuple[str | list[dict], str]]:
    """The (prompt, response) examples: the world's corpus, or cfg.data validated (quarantine
    beside the cache, wrong columns one error); a prompt with earlier turns is their messages
    (`loaders.sft_example`), rendered by models/chat.py as the policy's format has them."""
    if not cfg.data:
        return world.sft_corpus(cfg.corpus_size, np.random.default_rng(cfg.corpus_seed))
    quarantine = Path(cfg.output_dir).expanduser().resolve() / "quarantine" / f"sft-{sft_cache_key(cfg)}.jsonl"
    examples, summary = load_sft_examples(cfg.data, split=cfg.data_split or None, quarantine_path=quarantine,
                                          max_quarantine_fraction=cfg.max_quarantine_fraction)
    print(f"[sft] {cfg.data}: {summary['rows_valid']}/{summary['rows_total']} examples valid, "
          f"{summary['rows_quarantined']} quarantined {summary['by_reason']} -> {summary['path']}", flush=True)
    if not examples:
        raise ValueError(f"SFTConfig.data={cfg.data!r}: no valid example")
    return examples


def corpus_vocabulary(world, corpus: list[tuple[str | list[dict], str]]) -> list[str]:
    """The tiny tokenizer's words: the world's and those of the examples (own data; a
    conversation's as the tiny format reads it, its transcript)."""
    texts = (prompt if isinstance(prompt, str) else render_context(prompt) for prompt, _ in corpus)
    words = {w for text, (_, response) in zip(texts, corpus) for w in (text + " " + response).split()}
    return world.vocabulary() + sorted(words - set(SPECIAL_TOKENS))


class SFTSpec(LoopSpec):
    """Causal-LM training on pre-tokenized examples; batches drawn with a (seed, rank, step)
    RNG so a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, model_cfg: ModelConfig, tokenizer, examples: list[tuple[list[int], int]],
                 seed: int, data_key: str = ""):
        self.model_cfg, self.tokenizer, self.examples, self.seed = model_cfg, tokenizer, examples, seed
        self.data_key = data_key  # what the examples were drawn from (for the run's fingerprint)

    def build_model(self, role: str = PRIMARY_ROLE) -> torch.nn.Module:
        model = build_policy(self.model_cfg, self.tokenizer)
        return add_lora(model, self.model_cfg.lora) if self.model_cfg.lora else model

    def fingerprint(self) -> dict:
        return {"spec": "SFTSpec", "model": to_dict(self.model_cfg), "data": self.data_key,
                "seed": self.seed, "examples": len(self.examples)}

    def loss(self, batch, ctx: StepContext):
        logits = ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = sft_loss(logits, batch["input_ids"], batch["response_mask"])
        return loss, {"response_tokens": float(batch["response_mask"].sum())}

    def batches(self, ctx: StepContext) -> Iterator[dict]:
        """Batches drawn with a (seed, rank, step) RNG: a resumed run sees what an uninterrupted one saw."""
        shard = self.examples[ctx.rank::ctx.world_size]
        if not shard:
            raise ValueError(f"SFTSpec: no examples for rank {ctx.rank} of {ctx.world_size}")
        for step in range(ctx.step - 1, 10**9):
            rng = np.random.default_rng([self.seed, ctx.rank, step])
            for _ in range(ctx.grad_accum):
                picks = rng.integers(len(shard), size=ctx.micro_batch_size)
                yield collate([shard[i] for i in picks], self.tokenizer.pad_token_id)

    def export(self, models, out_dir: Path) -> None:
        model = models[PRIMARY_ROLE]
        if hasattr(model, "merge_and_unload"):  # LoRA: the SFT policy is the merged model
            model = model.merge_and_unload()
        model.save_pretrained(out_dir)


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of (ids, prompt_length) examples with the response-token mask."""
    lengths = torch.tensor([len(ids) for ids, _ in examples])
    prompt_lengths = torch.tensor([n for _, n in examples])
    input_ids = torch.full((len(examples), int(lengths.max())), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths.unsqueeze(1)).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "response_mask": response_mask(prompt_lengths, lengths, input_ids.shape[1])}


def sft_output_dir(cfg: SFTConfig) -> Path:
    """Where train_sft saves (or finds) the model of cfg."""
    return Path(cfg.output_dir).expanduser().resolve() / f"sft-{sft_cache_key(cfg)}"


def train_sft(cfg: SFTConfig, restart: bool = False) -> Path:
    """Train (or reuse) the SFT policy of cfg; returns the folder with the model (safetensors),
    the tokenizer, metrics.json (one entry per step) and sft_config.json."""
    cfg.validate()
    out = sft_output_dir(cfg)
    if (out / CONFIG_FILE).exists():
        return out  # written last by the atomic swap: the folder is complete
    world = sft_world(cfg)
    corpus = sft_corpus(cfg, world)
    tokenizer = build_tokenizer(cfg.model, corpus_vocabulary(world, corpus) if cfg.data else world.vocabulary())
    examples = [encode_example(tokenizer, p, r, cfg.max_length) for p, r in corpus]
    runner_cfg = runner_config(cfg.training, cfg.resources, name=out.name,
                               storage_path=str(out.parent / "runs"), seed=cfg.corpus_seed,
                               log_every=max(1, cfg.training.steps // 12))
    spec = SFTSpec(cfg.model, tokenizer, examples, seed=cfg.corpus_seed,
                   data_key=sft_cache_key(cfg))
    result = run(spec, runner_cfg, restart=restart)

    def write(tmp: Path) -> None:
        shutil.copytree(result.export_path, tmp, dirs_exist_ok=True)
        tokenizer.save_pretrained(tmp)
        (tmp / METRICS_FILE).write_text(json.dumps(result.metrics))
        (tmp / CONFIG_FILE).write_text(json.dumps(to_dict(cfg), indent=2))

    return write_dir_atomically(out, write)


def read_metrics(model_dir: str | Path) -> list[dict[str, float]]:
    """The per-step metrics train_sft saved beside the model."""
    return json.loads((Path(model_dir) / METRICS_FILE).read_text())
