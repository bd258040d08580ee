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

    def validate(self) -> None:
        checks = [("n_prompts", self.n_prompts >= 1, "must be >= 1"),
                  ("samples_per_prompt", self.samples_per_prompt >= 1, "must be >= 1"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                  ("temperature", self.temperature > 0, "must be > 0"),
                  ("batch_size", self.batch_size >= 1, "must be >= 1"),
                  ("weight_grid", len(self.weight_grid) >= 2 and all(0.0 <= w <= 1.0 for w in self.weight_grid)
                   and self.weight_grid == sorted(self.weight_grid), "must be >= 2 increasing weights in [0, 1]"),
                  ("tie_tolerance", self.tie_tolerance >= 0, "must be >= 0")]
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


def judged_generations(world, model, tokenizer, prompts: list[str], cfg: EvalConfig,
                       instruction: str | None = None) -> tuple[list[str], list[Scores]]:
    """Generate ``samples_per_prompt`` responses per prompt (the instruction, if any, written
    after the prompt) and score each with the judges on the *bare* prompt.

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
    bare = list(prompts) * cfg.samples_per_prompt
    return texts, [world.judge(t, p) for t, p in zip(texts, bare)]


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
