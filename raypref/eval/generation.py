"""Judged generation: generate responses on prompts and score them with a scorer — the
simulated world's judges (`WorldScorer`) or a causal-LM judge in scoring mode (`JudgeScorer`).

Used by the soups experiment and the soups merge-weight sweep; `cfg` is any object with
`samples_per_prompt`, `batch_size`, `max_new_tokens`, `greedy`, `temperature` and `seed`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from raypref.data.users import preference_table, psoups_profile
from raypref.models.chat import has_chat_template
from raypref.models.factory import generate

Scores = dict[str, float]


@dataclass
class GenerationSettings:
    """How judged generations are sampled (the soups job's EvalConfig carries the same fields)."""

    samples_per_prompt: int = 1
    batch_size: int = 96
    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 1.0
    seed: int = 0


QUALITY_TEXT = ("Generate/Choose a response that answers the question correctly, stays on "
                "topic and is well written, without repetition.")


def with_weights(template: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``template`` holding ``state`` (every key must match)."""
    model = copy.deepcopy(template)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # GPT-2 ties lm_head to the input embedding: a state dict may carry either name.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"merged state does not fit the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model.eval()


class WorldScorer:
    """The simulated world's attribute judges, plus its general-quality judge."""

    def __init__(self, world):
        self.world = world

    def table(self, preferences: list[str]) -> dict[str, tuple[str, int]]:
        return preference_table(preferences)

    def sweep_key(self, preference: str) -> str:
        """The score a dimension's sweep reads: the attribute its raising preference raises."""
        return psoups_profile(preference).attribute

    def score(self, texts: list[str], prompts: list[str]) -> list[Scores]:
        return [{**self.world.judge(t, p), "quality": self.world.quality(t, p)}
                for t, p in zip(texts, prompts)]


class JudgeScorer:
    """A causal LM judge in scoring mode: each response rated alone against each preference's
    text (key: the preference name, 1..5) and against a general-quality text (key "quality",
    put on 0..1 like the world's quality)."""

    def __init__(self, judge, preference_texts: dict[str, str]):
        self.judge, self.texts = judge, dict(preference_texts)

    def table(self, preferences: list[str]) -> dict[str, tuple[str, int]]:
        from raypref.eval.llm_judge import preference_table as judge_table
        return judge_table(preferences)

    def sweep_key(self, preference: str) -> str:
        return preference

    def score(self, texts: list[str], prompts: list[str]) -> list[Scores]:
        keys = list(self.texts) + ["quality"]
        questions = {**self.texts, "quality": QUALITY_TEXT}
        items = [(questions[k], p, t) for t, p in zip(texts, prompts) for k in keys]
        ratings = self.judge.rate(items)
        out = []
        for i in range(len(texts)):
            row = dict(zip(keys, ratings[i * len(keys):(i + 1) * len(keys)]))
            row["quality"] = (row["quality"] - 1.0) / 4.0
            out.append(row)
        return out


TEXT_KEYS = ("verbosity", "expertise", "friendliness", "quality")  # what a TextScorer scores


class TextScorer:
    """The text judges (`rewards.text.TextObjectives` over `TEXT_KEYS`) on real text: each
    P-Soups dimension by its judge on a footing near 0..1 (verbosity words / N, expertise
    Flesch–Kincaid grade / 20, friendliness VADER in −1..1), quality as judged (0..1), and
    quality's parts (relevance, repetition, fluency) for the report."""

    def __init__(self, objectives):
        self.objectives = objectives

    def table(self, preferences: list[str]) -> dict[str, tuple[str, int]]:
        from raypref.data.users import text_attribute

        return {name: (text_attribute(name), int(psoups_profile(name).direction)) for name in preferences}

    def sweep_key(self, preference: str) -> str:
        from raypref.data.users import text_attribute

        return text_attribute(preference)

    def score(self, texts: list[str], prompts: list[str]) -> list[Scores]:
        raw = self.objectives.raw(prompts, texts)
        scaled = self.objectives.scaled(raw).numpy()
        keys = self.objectives.objectives
        return [{**{k: float(scaled[i, j]) for j, k in enumerate(keys)},
                 **{part: float(raw[part][i]) for part in ("relevance", "repetition", "fluency")}}
                for i in range(len(texts))]


def judged_generations(scorer, model, tokenizer, prompts: list[str], cfg,
                       instruction: str | None = None) -> tuple[list[str], list[Scores]]:
    """Generate ``samples_per_prompt`` responses per prompt (the instruction, if any, as the
    system message, or written after the prompt in the tiny format) and score each on the *bare* prompt.

    Every method sees the same prompts and seeds, so comparisons between methods are paired.
    Returns texts and scores in the order prompt 0..n-1 for sample 0, then for sample 1, ...
    """
    if cfg.samples_per_prompt < 1:  # e.g. the soups EvalConfig's 0 = "by seed count", unresolved
        raise ValueError(f"judged_generations: samples_per_prompt={cfg.samples_per_prompt} must be >= 1")
    texts: list[str] = []
    # a chat template takes the instruction as the system message; the tiny format after the prompt
    system = instruction if instruction and has_chat_template(tokenizer) else None
    shown = [f"{p} {instruction}" if instruction and system is None else p for p in prompts]
    for sample in range(cfg.samples_per_prompt):
        for start in range(0, len(shown), cfg.batch_size):
            texts += generate(model, tokenizer, shown[start:start + cfg.batch_size],
                              max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy,
                              temperature=cfg.temperature,
                              seed=cfg.seed + 100_003 * sample + start, system=system)
    return texts, scorer.score(texts, list(prompts) * cfg.samples_per_prompt)


def mean_scores(scores: list[Scores]) -> Scores:
    keys = scores[0].keys() if scores else []
    return {k: float(np.mean([s[k] for s in scores])) for k in keys}
