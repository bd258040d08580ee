"""Few-shot prompting baseline of the conditional reward models (Liu 2025 §3.3): no training; a
causal LM reads k of a user's labelled comparisons and then judges a new pair.

Which k questions to ask a user: greedily by information gain about who the user is
(Liu 2025 eq. 5-7, `algos.info_gain`) or at random. The questions are the users' demonstration
pools, pooled; ``choices[z, j]`` is what user z prefers on question j, by the user's utility
over the pair's latent scores (the world's noise-free answer). Greedy picks one question set
for the whole population; each user's prompt carries that user's own answers.

A test pair is scored in both orders (the chosen response as "A", then as "B") so that a
model's letter bias cancels: it is right when
log p(A | chosen first) − log p(B | chosen first) > log p(A | chosen second) − log p(B | chosen second).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from raypref.algos.info_gain import greedy_select, mutual_information, random_select
from raypref.data.records import PreferenceRecord
from raypref.data.users import User
from raypref.models.factory import TINY, ModelConfig, build_policy, build_tokenizer
from raypref.recipes.reward_data import RewardDataConfig, UserPairs, build_pairs

SELECTIONS = ("greedy", "random")
TEMPLATE_WORDS = ("question:", "response", "A:", "B:", "preferred:", "A", "B")


@dataclass
class FewShotConfig:
    # the causal LM: "tiny" (an untrained GPT-2 over the world's words: expect chance), a
    # local folder (e.g. a warm-started policy) or a cached HF id
    model: ModelConfig = field(default_factory=lambda: ModelConfig(n_positions=1024))
    k: int = 4                        # demonstrations in the prompt
    random_draws: int = 3             # random selections averaged against the greedy one
    batch_size: int = 8
    seed: int = 0

    def validate(self) -> None:
        self.model.validate()
        for name in ("k", "random_draws", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"few_shot.{name}={getattr(self, name)}: must be >= 1")


def question_pool(pairs: dict[int, UserPairs], demo_pool: int) -> list[PreferenceRecord]:
    """Every user's demonstration pool (its first ``demo_pool`` train pairs), pooled."""
    return [r for uid in sorted(pairs) for r in pairs[uid].train[:demo_pool]]


def choice_matrix(users: list[User], questions: list[PreferenceRecord]) -> np.ndarray:
    """[users, questions]: 0 when the user prefers the record's ``chosen`` response, 1 when
    ``rejected`` (ties count as 0)."""
    return np.array([[int(u.utility(q.rejected_scores) > u.utility(q.chosen_scores))
                      for q in questions] for u in users], dtype=np.int64)


def _block(prompt: str, first: str, second: str) -> str:
    return f"question: {prompt} response A: {first} response B: {second} preferred:"


def few_shot_prompt(demos: list[tuple[PreferenceRecord, int]], prompt: str, first: str,
                    second: str, rng: np.random.Generator) -> str:
    """k answered comparisons (each shown in a random order) then the unanswered one.
    ``demos``: (question, the user's choice: 0 = its chosen, 1 = its rejected)."""
    parts = []
    for record, choice in demos:
        swap = bool(rng.integers(2))
        a, b = (record.rejected, record.chosen) if swap else (record.chosen, record.rejected)
        parts.append(f"{_block(record.prompt, a, b)} {'B' if swap != bool(choice) else 'A'}")
    return " ".join(parts + [_block(prompt, first, second)])


class LetterScorer:
    """log p(" A") − log p(" B") of a causal LM after each prompt (left-truncated to fit)."""

    def __init__(self, model, tokenizer, max_length: int):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length
        self.letters = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in "AB"]
        if self.letters[0] == self.letters[1] or tokenizer.unk_token_id in self.letters:
            raise ValueError("few-shot: the tokenizer cannot tell the answers 'A' and 'B' apart")

    @torch.no_grad()
    def margins(self, prompts: list[str], batch_size: int = 8) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), batch_size):
            ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"][-self.max_length:]
                   for p in prompts[start:start + batch_size]]
            width = max(len(x) for x in ids)
            pad = self.tokenizer.pad_token_id or 0
            input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits.float()
            last = logits[torch.arange(len(ids)), mask.sum(1) - 1].log_softmax(-1)
            out.append(last[:, self.letters[0]] - last[:, self.letters[1]])
        return torch.cat(out)


def build_scorer(cfg: FewShotConfig, world_vocabulary: list[str]) -> LetterScorer:
    tokenizer = build_tokenizer(cfg.model, list(world_vocabulary) + list(TEMPLATE_WORDS))
    torch.manual_seed(cfg.seed)
    model = build_policy(cfg.model, tokenizer)
    max_length = (cfg.model.n_positions if cfg.model.name_or_path == TINY
                  else int(getattr(model.config, "max_position_embeddings", 1024)))
    return LetterScorer(model, tokenizer, max_length)


def user_accuracy(scorer: LetterScorer, demos: list[tuple[PreferenceRecord, int]],
                  test: list[PreferenceRecord], seed: int, batch_size: int) -> float:
    rng = np.random.default_rng(seed)
    prompts = []
    for r in test:  # the same demonstration order in both presentations of a pair
        state = rng.bit_generator.state
        prompts.append(few_shot_prompt(demos, r.prompt, r.chosen, r.rejected, rng))
        rng.bit_generator.state = state
        prompts.append(few_shot_prompt(demos, r.prompt, r.rejected, r.chosen, rng))
    margins = scorer.margins(prompts, batch_size).view(-1, 2)
    return float((margins[:, 0] > margins[:, 1]).float().mean())


def evaluate_few_shot(cfg: FewShotConfig, data: RewardDataConfig, eval_pairs_per_user: int,
                      scorer: LetterScorer | None = None) -> dict[str, float]:
    """Per-user test accuracy of few-shot prompting with greedy and with random selections
    (the mean over ``random_draws``), and the information I(Z; Q_S) of each selection."""
    from raypref.data.world import World

    cfg.validate()
    pairs = build_pairs(data)
    questions = question_pool(pairs, data.demo_pool)
    if cfg.k > len(questions):
        raise ValueError(f"few_shot.k={cfg.k}: more than the {len(questions)} questions pooled")
    users = [pairs[uid].user for uid in sorted(pairs)]
    choices = choice_matrix(users, questions)
    if scorer is None:
        scorer = build_scorer(cfg, World.from_config(data).vocabulary())
    rng = np.random.default_rng(cfg.seed)
    selections = {"greedy": [greedy_select(choices, cfg.k)],
                  "random": [random_select(len(questions), cfg.k, rng)
                             for _ in range(cfg.random_draws)]}
    result = {}
    for name, sets in selections.items():
        accs = {u.user_id: [] for u in users}
        for picked in sets:
            for z, user in enumerate(users):
                demos = [(questions[j], int(choices[z, j])) for j in picked]
                test = pairs[user.user_id].test[:eval_pairs_per_user]
                accs[user.user_id].append(user_accuracy(scorer, demos, test, cfg.seed + z,
                                                        cfg.batch_size))
        for uid, values in accs.items():
            result[f"{name}.acc.user{uid}"] = float(np.mean(values))
        result[f"{name}.acc.mean"] = float(np.mean([np.mean(v) for v in accs.values()]))
        result[f"{name}.information"] = float(np.mean([mutual_information(choices, s)
                                                       for s in sets]))
    return result
