"""Loop spec: DPA rejection-sampling fine-tuning (DPA §2.2, §3.1).

Iteration t (``steps_per_iteration`` optimizer steps each) first builds its dataset D_t with
the current policy: for prompts from one half of the prompt pool (halves alternate), sample
directions v, generate ``n_samples`` responses to the prompt conditioned on v (`direction_query`)
in one batched call, and keep the response with the highest ``v·r`` under the frozen
multi-objective reward.
D_t plus a replay share of original (prompt, response) data is then fitted with the SFT loss.
With ``candidates="prompt"`` a (prompt, direction) keeps the best of all the responses drawn for
the prompt under any of its directions: a variant, not DPA. A base that barely reads the
direction (SmolLM2-135M: its lengths moved 0.9 sd from (1, 0) to (0.71, −0.71)) draws alike
under every direction, so DPA's own-samples choice kept answers whose length followed the
direction only weakly (correlation +0.3 over an iteration); choosing from the shared candidates
keeps, for one prompt, the long best answer under (1, 0) and the short one under a negative
verbosity weight, the contrast the policy must learn to read from the digits.
Deviations from DPA: the policy keeps training across iterations (DPA restarts each iteration
from the SFT checkpoint and only samples with the last policy). With ``bare_first_iteration``
(default) D_1's candidates are sampled from the bare prompt and stored under the conditioned
one: DPA's base (Mistral-7B-Instruct) follows a system prompt it was never tuned on, a small SFT
base does not (the tiny default's answers fall from ~75 to ~16-32 words when the unseen
direction text is prepended, below the verbosity judge's range, so v·r would rank on
helpfulness alone and no length control could be learned).

Where v goes (`direction_query`): a tokenizer with a chat template (SmolLM2) reads DPA's system
prompt (``algos.dpa.direction_system_prompt``, numbers as digits) as the system message, as DPA
writes it; a tokenizer without one (the tiny word-level model) reads ``direction_text(v)``
(default: the same prompt spelled token by token) before the prompt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raypref.algos.dpa import (
    DEFAULT_ANGLES,
    best_of_n,
    direction_system_prompt,
    prompt_half,
    sample_directions,
    spelled,
    with_replay,
)
from raypref.algos.sft import sft_loss
from raypref.models.chat import has_chat_template
from raypref.models.factory import encode_example, generate_ids, load_pretrained
from raypref.recipes.sft import collate
from raypref.train.spec import PRIMARY_ROLE, LoopSpec, Role, StepContext, save_module


CANDIDATES = ("own", "prompt")


def kept_indices(directions: torch.Tensor, rewards: torch.Tensor, n_samples: int,
                 directions_per_prompt: int, candidates: str = "own") -> list[int]:
    """Index (into the responses, query by query, ``n_samples`` each; a prompt's
    ``directions_per_prompt`` queries in a row) of the response kept for each query: the best by
    ``v·r`` among the query's own samples ("own", DPA), or among all its prompt's ("prompt")."""
    k = rewards.shape[-1]
    if candidates == "own":
        best = best_of_n(directions, rewards.view(len(directions), n_samples, k))
        return [q * n_samples + int(b) for q, b in enumerate(best)]
    per_prompt = directions_per_prompt * n_samples
    shared = rewards.view(-1, per_prompt, k).repeat_interleave(directions_per_prompt, dim=0)
    best = best_of_n(directions, shared)
    return [(q // directions_per_prompt) * per_prompt + int(b) for q, b in enumerate(best)]


def selection_metrics(directions: torch.Tensor, kept: list[str], objectives: list[str]) -> dict[str, float]:
    """What D_t teaches: the kept responses' mean length, and how their length correlates with each
    direction component (e.g. length falling as the verbosity weight falls). A correlation near 0
    means the directions all keep alike responses, so no length control can be learned from it."""
    words = torch.tensor([len(r.split()) for r in kept], dtype=torch.float)
    out = {"rsf/kept_words": float(words.mean())}
    for i, name in enumerate(objectives):
        weight = directions[:, i].float()
        if len(kept) > 1 and weight.std() > 0 and words.std() > 0:
            out[f"rsf/kept_words_corr_{name}"] = float(torch.corrcoef(torch.stack([weight, words]))[0, 1])
    return out


def spelled_direction(direction, objectives) -> str:
    """DPA's system prompt with its numbers spelled token by token (for word-level tokenizers)."""
    return spelled(direction_system_prompt(direction, objectives))


def direction_query(tokenizer, direction, objectives, prompt: str,
                    direction_text: Callable | None = None) -> tuple[str, str | None]:
    """(prompt text, system text) that ask for ``direction``: with a chat template, the prompt as
    the user message and DPA's system prompt as the system message; without one, the tiny format
    has no system message, so ``direction_text(v)`` (default `spelled_direction`) precedes the prompt."""
    direction = [float(x) for x in direction]
    if has_chat_template(tokenizer):
        return prompt, direction_system_prompt(direction, objectives)
    text = direction_text(direction) if direction_text else spelled_direction(direction, objectives)
    return f"{text} {prompt}", None


@dataclass
class RSFSpec(LoopSpec):
    """``reward_factory()`` builds a module with ``score_objectives(prompts, responses) -> [B, k]``
    over ``objectives`` (in order). ``direction_text(v)`` writes v before the prompt of a tokenizer
    without a chat template (`direction_query`). Examples are (prompt, response, system) triples."""

    sft_dir: str
    prompts: list[str]
    original: list[tuple[str, str]]  # (prompt, response) pairs replayed (without a system text) into every D_t
    reward_factory: Callable
    objectives: list[str] = field(default_factory=lambda: ["helpfulness", "verbosity"])
    direction_text: Callable | None = None
    n_samples: int = 16  # responses per (prompt, direction); DPA keeps 1 of 16
    directions_per_prompt: int = 5  # DPA: 5
    prompts_per_iteration: int = 32
    steps_per_iteration: int = 50
    replay_fraction: float = 0.15  # DPA: about 15% of each iteration's data
    angle_range: tuple[float, float] = DEFAULT_ANGLES
    max_new_tokens: int = 48
    max_length: int = 160
    temperature: float = 1.0
    bare_first_iteration: bool = True  # D_1 sampled without the direction text (see the module doc)
    # which responses compete for a (prompt, direction): "own" (DPA) the n_samples drawn under that
    # direction; "prompt" every response drawn for the prompt under any of its directions
    # (directions_per_prompt x n_samples), so directions of one prompt keep answers of different
    # lengths even while the policy does not yet read the direction (see the module doc)
    candidates: str = field(default="own", metadata={"digest_unless_default": True})

    def __post_init__(self) -> None:
        if len(self.prompts) < 2:
            raise ValueError("RSFSpec.prompts: need at least 2 prompts (two halves)")
        for name in ("n_samples", "directions_per_prompt", "prompts_per_iteration", "steps_per_iteration"):
            if getattr(self, name) < 1:
                raise ValueError(f"RSFSpec.{name}={getattr(self, name)}: must be >= 1")
        if self.candidates not in CANDIDATES:
            raise ValueError(f"RSFSpec.candidates={self.candidates!r}: one of {CANDIDATES}")
        self._tokenizer = None
        self.iteration = 0  # the iteration whose dataset is held
        self.examples: list[tuple[str, str, str | None]] = []
        self.selection_metrics: dict[str, float] = {}  # of the held dataset (selection_metrics)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def roles(self) -> dict[str, Role]:
        return {PRIMARY_ROLE: Role(), "reward": Role(trainable=False)}

    def tokenizer(self):
        if self._tokenizer is None:
            _, self._tokenizer = load_pretrained(self.sft_dir)
        return self._tokenizer

    def build_model(self, role: str = PRIMARY_ROLE) -> torch.nn.Module:
        if role == "reward":
            return self.reward_factory()
        model, self._tokenizer = load_pretrained(self.sft_dir)
        return model

    def conditioned(self, direction: torch.Tensor, prompt: str) -> tuple[str, str | None]:
        return direction_query(self.tokenizer(), direction.tolist(), self.objectives, prompt, self.direction_text)

    @torch.no_grad()
    def rejection_sample(self, ctx: StepContext, iteration: int) -> list[tuple[str, str, str | None]]:
        """D_t: the best of ``n_samples`` responses by ``v·r`` for each (prompt, direction)."""
        rng = random.Random(ctx.seed * 1_000_003 + ctx.rank * 7919 + iteration)
        pool = prompt_half(self.prompts, iteration)
        prompts = [pool[rng.randrange(len(pool))] for _ in range(self.prompts_per_iteration)]
        generator = torch.Generator().manual_seed(rng.randrange(2**31))
        directions = sample_directions(len(prompts) * self.directions_per_prompt, len(self.objectives),
                                       self.angle_range, generator=generator)
        queries = [self.conditioned(v, p) for v, p in
                   zip(directions, [p for p in prompts for _ in range(self.directions_per_prompt)])]
        repeated = [q for q in queries for _ in range(self.n_samples)]
        sampled_from = repeated
        if iteration == 1 and self.bare_first_iteration:
            sampled_from = [(p, None) for p in prompts for _ in range(self.directions_per_prompt * self.n_samples)]
        tokenizer = self.tokenizer()
        ids = generate_ids(ctx.models[PRIMARY_ROLE], tokenizer, [p for p, _ in sampled_from], self.max_new_tokens,
                           greedy=False, temperature=self.temperature, seed=rng.randrange(2**31),
                           system=[s for _, s in sampled_from] if has_chat_template(tokenizer) else None)
        texts = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
        # the judges read the prompt as the user wrote it (a tiny-format query keeps its direction text)
        rewards = ctx.models["reward"].score_objectives([p for p, _ in repeated], texts).float()
        if rewards.shape != (len(repeated), len(self.objectives)):
            raise ValueError(f"reward score_objectives gave {tuple(rewards.shape)}, expected "
                             f"({len(repeated)}, {len(self.objectives)}) for objectives {self.objectives}")
        kept = [(p, texts[i], system) for (p, system), i in
                zip(queries, kept_indices(directions, rewards, self.n_samples, self.directions_per_prompt,
                                          self.candidates))]
        self.selection_metrics = selection_metrics(directions, [r for _, r, _ in kept], self.objectives)
        return kept

    def batches(self, ctx: StepContext) -> Iterator[dict]:
        tokenizer = self.tokenizer()
        index = ctx.micro_batches_done
        while True:
            step = index // ctx.grad_accum + 1
            iteration = (step - 1) // self.steps_per_iteration + 1
            if iteration != self.iteration:
                selected = self.rejection_sample(ctx, iteration)
                self.examples = with_replay(selected, [(p, r, None) for p, r in self.original],
                                            self.replay_fraction, random.Random(ctx.seed * 31 + iteration))
                self.iteration = iteration
            picks = np.random.default_rng([ctx.seed, ctx.rank, index]).integers(len(self.examples),
                                                                                size=ctx.micro_batch_size)
            encoded = [encode_example(tokenizer, prompt, response, self.max_length, system=system)
                       for prompt, response, system in (self.examples[i] for i in picks)]
            yield collate(encoded, tokenizer.pad_token_id)
            index += 1

    def loss(self, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        model = ctx.models[PRIMARY_ROLE]
        device = ctx.device
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return (sft_loss(logits, batch["input_ids"], batch["response_mask"]),
                {"rsf/iteration": float(self.iteration), **self.selection_metrics})

    def export(self, models: dict[str, torch.nn.Module], out_dir) -> None:
        """The policy with its tokenizer (it may carry added tokens): a folder load_pretrained reads."""
        save_module(models[PRIMARY_ROLE], Path(out_dir))
        self.tokenizer().save_pretrained(out_dir)

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "examples": list(self.examples),
                "selection_metrics": dict(self.selection_metrics)}

    def load_state_dict(self, state: dict) -> None:
        # a checkpoint from before system texts holds (prompt, response) pairs
        self.iteration = int(state["iteration"])
        self.examples = [(e[0], e[1], e[2] if len(e) > 2 else None) for e in state["examples"]]
        self.selection_metrics = dict(state.get("selection_metrics", {}))
