"""Evaluate soups and baselines: generate on held-out prompts, score with the world's judges.

Kept apart from training and from the report: everything here takes models and returns
plain numbers, so the report and the tests can use it the same way.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from raypref.data.users import psoups_profile
from raypref.models.factory import generate

Scores = dict[str, float]
# extra P-Soups arms -> the name they carry in the tables
SOUP_ARMS = {"instructed": "P-Soups+instr", "ab_avg": "P-Soups (A/B avg)"}
QUALITY_TEXT = ("Generate/Choose a response that answers the question correctly, stays on "
                "topic and is well written, without repetition.")


@dataclass
class EvalConfig:
    n_prompts: int = 96          # held-out (test split) prompts: the world has 96
    samples_per_prompt: int = 2  # more samples per prompt: smaller sampling noise in the means
    max_new_tokens: int = 128    # the world's longest responses are ~100 tokens
    greedy: bool = False         # sampling shows the policy's distribution, not one mode
    temperature: float = 1.0
    seed: int = 0                # same seed for every method: paired comparisons
    batch_size: int = 96
    weight_grid: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    tie_tolerance: float = 0.05  # judge differences within this are ties (002 §E.1)
    # an arm whose mean quality is below SFT's by more than this gets a report line, and a
    # weight sweep whose quality falls that far below SFT's is not counted as monotone
    quality_margin: float = 0.05
    # P-Soups arms beside the plain one (bare prompts, `merge_method`): "instructed" (the
    # combination's instruction in the prompt too) and "ab_avg" (lora_factors_linear merge)
    arms: list[str] = field(default_factory=lambda: list(SOUP_ARMS))
    n_boot: int = 2000           # bootstrap replicates of the win-rate intervals
    # "" = the simulated world's judges; else a causal LM judge in scoring mode (seed 001
    # §5.3.2): "tiny" (tests) or a Hugging Face id / local folder. Required with real data.
    judge_model: str = ""
    # evaluation prompts (.txt one a line, or .jsonl); "" = the world's test-split prompts
    prompts_file: str = ""

    def validate(self) -> None:
        checks = [("n_prompts", self.n_prompts >= 1, "must be >= 1"),
                  ("samples_per_prompt", self.samples_per_prompt >= 1, "must be >= 1"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                  ("temperature", self.temperature > 0, "must be > 0"),
                  ("batch_size", self.batch_size >= 1, "must be >= 1"),
                  ("weight_grid", len(self.weight_grid) >= 2 and all(0.0 <= w <= 1.0 for w in self.weight_grid)
                   and self.weight_grid == sorted(self.weight_grid), "must be >= 2 increasing weights in [0, 1]"),
                  ("tie_tolerance", self.tie_tolerance >= 0, "must be >= 0"),
                  ("quality_margin", self.quality_margin >= 0, "must be >= 0"),
                  ("arms", set(self.arms) <= set(SOUP_ARMS), f"must be among {list(SOUP_ARMS)}"),
                  ("n_boot", self.n_boot >= 1, "must be >= 1")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"eval.{name}={getattr(self, name)!r}: {rule}")


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
        from raypref.experiments.soups.preferences import preference_table
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
        from raypref.eval.llm_judge import preference_table
        return preference_table(preferences)

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


def make_scorer(cfg: EvalConfig, world, preferences: list[str]):
    """The world's judges, or the LM judge of ``cfg.judge_model`` over ``preferences``
    (Table-4 texts for a real judge, word-level ones the tiny judge's vocabulary knows)."""
    if not cfg.judge_model:
        return WorldScorer(world)
    from raypref.eval.llm_judge import JudgeConfig, ScoringJudge

    tiny = cfg.judge_model == "tiny"
    judge = ScoringJudge.from_config(JudgeConfig(model=cfg.judge_model),
                                     vocabulary=world.vocabulary() if tiny else ())
    texts = {n: psoups_profile(n).instruction if tiny else psoups_profile(n).prompt
             for n in preferences}
    return JudgeScorer(judge, texts)


def eval_prompts(cfg: EvalConfig, world) -> list[str]:
    """The prompts every method answers: the user's prompts file, else the world's test split."""
    if cfg.prompts_file:
        from raypref.eval.prompts import load_prompts
        return load_prompts(cfg.prompts_file)[:cfg.n_prompts]
    return world.prompts(cfg.n_prompts, split="test")


def instruction_text(world, combo, hf_base: bool) -> str:
    """A combination's instruction as the policy reads it: Table-4 sentences for a Hugging
    Face base, the world's word-level text for the tiny one."""
    if hf_base:
        return " ".join(psoups_profile(n).prompt for n in combo)
    return world.preference_instruction(list(combo))


def judged_generations(scorer, model, tokenizer, prompts: list[str], cfg: EvalConfig,
                       instruction: str | None = None) -> tuple[list[str], list[Scores]]:
    """Generate ``samples_per_prompt`` responses per prompt (the instruction, if any, written
    after the prompt) and score each on the *bare* prompt.

    Every method sees the same prompts and seeds, so comparisons between methods are paired.
    Returns texts and scores in the order prompt 0..n-1 for sample 0, then for sample 1, ...
    """
    texts: list[str] = []
    shown = [f"{p} {instruction}" if instruction else p for p in prompts]
    for sample in range(cfg.samples_per_prompt):
        for start in range(0, len(shown), cfg.batch_size):
            texts += generate(model, tokenizer, shown[start:start + cfg.batch_size],
                              max_new_tokens=cfg.max_new_tokens, greedy=cfg.greedy,
                              temperature=cfg.temperature,
                              seed=cfg.seed + 100_003 * sample + start)
    return texts, scorer.score(texts, list(prompts) * cfg.samples_per_prompt)


def mean_scores(scores: list[Scores]) -> Scores:
    keys = scores[0].keys() if scores else []
    return {k: float(np.mean([s[k] for s in scores])) for k in keys}


# ---------------------------------------------------------------- merge-weight sweeps

def dimensions_of(preferences: list[str]) -> dict[str, tuple[str, str]]:
    """{dimension: (preference raising its attribute, preference lowering it)} for every
    dimension both of whose preferences are in the set."""
    by_dim: dict[str, dict[int, str]] = {}
    for name in preferences:
        profile = psoups_profile(name)
        by_dim.setdefault(profile.dimension, {})[int(profile.direction)] = name
    return {dim: (d[1], d[-1]) for dim, d in by_dim.items() if 1 in d and -1 in d}


def sweep_weights(dims: dict[str, tuple[str, str]], dimension: str, t: float,
                  others: float = 0.5) -> dict[str, float]:
    """Soup weights with share ``t`` of ``dimension``'s mass on its attribute-raising
    preference; every other dimension split ``others`` / ``1 - others``. Sums to 1."""
    mass = 1.0 / len(dims)
    weights = {}
    for dim, (up, down) in dims.items():
        share = t if dim == dimension else others
        weights[up] = mass * share
        weights[down] = mass * (1.0 - share)
    return weights


def is_monotonic(values: list[float], increasing: bool = True) -> bool:
    """Strictly monotonic (a flat step counts as a failure: the weight had no effect)."""
    diffs = np.diff(values)
    return bool(np.all(diffs > 0) if increasing else np.all(diffs < 0))
