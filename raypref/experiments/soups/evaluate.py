"""Evaluate soups and baselines: generate on held-out prompts, score with the world's judges.

Kept apart from training and from the report: everything here takes models and returns
plain numbers, so the report and the tests can use it the same way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from raypref.config import check_fields
from raypref.data.labelling import combination_instruction
from raypref.data.users import psoups_profile
from raypref.models.factory import AUTO, DTYPES
from raypref.eval.generation import (TEXT_KEYS, JudgeScorer, Scores, TextScorer, WorldScorer,  # noqa: F401
                                     judged_generations, mean_scores, with_weights)

DTYPE_NAMES = sorted(DTYPES) + [AUTO]

# extra P-Soups arms -> the name they carry in the tables
SOUP_ARMS = {"instructed": "P-Soups+instr", "ab_avg": "P-Soups (A/B avg)"}


@dataclass
class EvalConfig:
    n_prompts: int = 96          # held-out (test split) prompts: the world has 96
    # samples per prompt and seed; 0 = 2 with one training seed, 1 with several: every arm is
    # judged on at least 2 × n_prompts samples, and a 3-seed run does not judge 576 per arm
    samples_per_prompt: int = 0
    max_new_tokens: int = 128    # the world's longest responses are ~100 tokens
    greedy: bool = False         # sampling shows the policy's distribution, not one mode
    temperature: float = 1.0
    seed: int = 0                # same seed for every method: paired comparisons
    batch_size: int = 96
    weight_grid: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    # a dimension's sweep soups: false = all preferences, the other dimensions held at 50/50 (a
    # P-Soups user of every dimension; each dimension carries a third of the mass); true = the
    # dimension's two policies alone, w and 1 - w (the whole difference between them)
    sweep_alone: bool = False
    tie_tolerance: float = 0.05  # judge differences within this are ties (P-Soups §E.1)
    # an arm whose mean quality is below SFT's by more than this gets a report line, and a
    # weight sweep whose quality falls that far below SFT's is not counted as monotone
    quality_margin: float = 0.05
    # P-Soups arms beside the plain one (bare prompts, `merge_method`): "instructed" (the
    # combination's instruction in the prompt too) and "ab_avg" (lora_factors_linear merge)
    arms: list[str] = field(default_factory=lambda: list(SOUP_ARMS))
    n_boot: int = 2000           # bootstrap replicates of the win-rate intervals
    # the weight sweeps' own design (0 = n_prompts / samples_per_prompt above): neighbouring
    # weights differ little, so a sweep can need more answers than the win rates do (SmolLM2:
    # 40 x 2 left one flat step that 72 x 4 settled, docs/RESULTS.md)
    sweep_n_prompts: int = 0
    sweep_samples_per_prompt: int = 0
    # "" = the simulated world's judges; else a causal LM judge in scoring mode (Liu 2025
    # §5.3.2): "tiny" (tests) or a Hugging Face id / local folder. Required with real data.
    judge_model: str = ""
    # the text judges (rewards/text.py) on real text instead: words / verbosity_words, reading
    # grade / 20, VADER sentiment per dimension; quality = relevance x (1 - repetition) x the
    # fluency gate under the frozen base. For a base that writes English (base_policy)
    text_judges: bool = False
    verbosity_words: float = 100.0
    # evaluation prompts (.txt one a line, or .jsonl); "" = the world's test-split prompts (with
    # pool pairs: the test split of the pool's prompts, never a prompt the policies trained on)
    prompts_file: str = ""
    # the LM judge's dtype ("auto": bf16 on a GPU that has it, fp16 on one without, fp32 on CPU),
    # decided on the evaluation worker that loads it
    judge_dtype: str = "auto"
    # evaluation (merging, generation, judging, held-out accuracy) runs on Ray workers, one actor
    # per training seed; the driver only aggregates. GPUs per actor ("auto": 1 when the cluster has GPUs, else 0)
    num_gpus: float | str = "auto"
    # CPUs per evaluation actor, also its torch threads (capped at the cluster's CPUs)
    num_cpus: float = 2.0

    def validate(self) -> None:
        checks = [("n_prompts", self.n_prompts >= 1, "must be >= 1"),
                  ("samples_per_prompt", self.samples_per_prompt >= 0, "must be >= 0 (0 = by the seed count)"),
                  ("sweep_n_prompts", self.sweep_n_prompts >= 0, "must be >= 0 (0 = n_prompts)"),
                  ("sweep_samples_per_prompt", self.sweep_samples_per_prompt >= 0,
                   "must be >= 0 (0 = samples_per_prompt)"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                  ("temperature", self.temperature > 0, "must be > 0"),
                  ("batch_size", self.batch_size >= 1, "must be >= 1"),
                  ("weight_grid", len(self.weight_grid) >= 2 and all(0.0 <= w <= 1.0 for w in self.weight_grid)
                   and self.weight_grid == sorted(self.weight_grid), "must be >= 2 increasing weights in [0, 1]"),
                  ("tie_tolerance", self.tie_tolerance >= 0, "must be >= 0"),
                  ("quality_margin", self.quality_margin >= 0, "must be >= 0"),
                  ("arms", set(self.arms) <= set(SOUP_ARMS), f"must be among {list(SOUP_ARMS)}"),
                  ("n_boot", self.n_boot >= 1, "must be >= 1"),
                  ("judge_dtype", self.judge_dtype in DTYPE_NAMES, f"must be one of {DTYPE_NAMES}"),
                  ("num_gpus", self.num_gpus == "auto" or (not isinstance(self.num_gpus, str)
                                                          and self.num_gpus >= 0), 'must be "auto" or >= 0'),
                  ("num_cpus", self.num_cpus > 0, "must be > 0"),
                  ("verbosity_words", self.verbosity_words > 0, "must be > 0")]
        check_fields("eval", self, checks)


def for_seeds(cfg: EvalConfig, seeds: int) -> EvalConfig:
    """``cfg`` with ``samples_per_prompt`` resolved for a run of ``seeds`` training seeds."""
    return dataclasses.replace(cfg, samples_per_prompt=cfg.samples_per_prompt or (2 if seeds == 1 else 1))


def sweep_design(cfg: EvalConfig) -> EvalConfig:
    """``cfg`` as the weight sweeps are judged: their own prompt count and samples where set
    (apply after `for_seeds`)."""
    return dataclasses.replace(cfg, n_prompts=cfg.sweep_n_prompts or cfg.n_prompts,
                               samples_per_prompt=cfg.sweep_samples_per_prompt or cfg.samples_per_prompt)


def check_scorer(cfg: EvalConfig, world, preferences: list[str]) -> None:
    """What the driver checks before training, without loading a judge: responses long enough
    for the world's verbosity judge; a judge folder that exists."""
    if not cfg.judge_model:
        low, high = world.verbosity_words()
        verbosity = [n for n in preferences if psoups_profile(n).attribute == "verbosity"]
        # the world's text is one token per word: a cut below `low` words scores 0 on every arm
        if verbosity and cfg.max_new_tokens <= low:
            raise ValueError(f"eval.max_new_tokens={cfg.max_new_tokens}: the world's verbosity "
                             f"judge (of {verbosity}) reads 0 up to {low:.0f} words and 1 from "
                             f"{high:.0f}; responses cut this short all score 0 (use >= {high:.0f})")
        return
    from pathlib import Path

    from raypref.models.factory import NAMED_MODELS

    folder = Path(cfg.judge_model).expanduser()
    looks_local = folder.exists() or cfg.judge_model.startswith((".", "/", "~"))
    if cfg.judge_model != "tiny" and cfg.judge_model not in NAMED_MODELS and looks_local \
            and not (folder / "config.json").exists():
        raise FileNotFoundError(f"eval.judge_model={cfg.judge_model!r}: no config.json in {folder}")


def scoring_table(cfg: EvalConfig, preferences: list[str]) -> dict[str, tuple[str, int]]:
    """{preference: (score key, direction)} the comparison reads: the world's attributes, or the
    LM judge's preference names (the same as the scorer's own ``table``, without a judge)."""
    if cfg.text_judges:
        return TextScorer(None).table(preferences)
    return JudgeScorer(None, {}).table(preferences) if cfg.judge_model \
        else WorldScorer(None).table(preferences)


def make_scorer(cfg: EvalConfig, world, preferences: list[str], device=None, base: str = ""):
    """The world's judges, the text judges (with ``base``, the frozen LM of the fluency gate), or
    the LM judge of ``cfg.judge_model`` over ``preferences`` (Table-4 texts for a real judge,
    word-level ones the tiny judge's vocabulary knows), in ``cfg.judge_dtype`` on ``device``
    (default: the CPU)."""
    if cfg.text_judges:
        from raypref.models.factory import load_pretrained
        from raypref.rewards.text import TextObjectives

        model, tokenizer = load_pretrained(base)
        if device is not None:
            model.to(device)
        return TextScorer(TextObjectives(TEXT_KEYS, cfg.verbosity_words, lm=(model.eval(), tokenizer)))
    check_scorer(cfg, world, preferences)
    if not cfg.judge_model:
        return WorldScorer(world)
    from raypref.eval.llm_judge import JudgeConfig, ScoringJudge

    tiny = cfg.judge_model == "tiny"
    judge = ScoringJudge.from_config(JudgeConfig(model=cfg.judge_model, dtype=cfg.judge_dtype),
                                     vocabulary=world.vocabulary() if tiny else ())
    if device is not None:
        judge.model.to(device)
    texts = {n: psoups_profile(n).instruction if tiny else psoups_profile(n).prompt
             for n in preferences}
    return JudgeScorer(judge, texts)


def eval_prompts(cfg: EvalConfig, world, pool_prompts: str | None = None) -> list[str]:
    """The prompts every method answers. Pairs from a pool (``pool_prompts``: its prompts file,
    "" = the project's questions): the test split of the user's prompts file or of the pool's,
    never a prompt the policies trained on; else the user's prompts file, else the world's
    test split."""
    from raypref.eval.prompts import load_prompts

    if pool_prompts is not None:
        return load_prompts(cfg.prompts_file or pool_prompts or None, split="test")[:cfg.n_prompts]
    if cfg.prompts_file:
        return load_prompts(cfg.prompts_file)[:cfg.n_prompts]
    return world.prompts(cfg.n_prompts, split="test")


def instruction_text(world, combo, hf_base: bool) -> str:
    """A combination's instruction as the policy reads it: Table-4 sentences for a Hugging
    Face base, the world's word-level text for the tiny one."""
    if hf_base:
        return combination_instruction("+".join(combo))
    return world.preference_instruction(list(combo))


# ---------------------------------------------------------------- merge-weight sweeps

def dimensions_of(preferences: list[str]) -> dict[str, tuple[str, str]]:
    """{dimension: (preference raising its attribute, preference lowering it)} for every
    dimension both of whose preferences are in the set."""
    # grouped by attribute too: P3C (sass) and P3D (sarcasm) share style's dimension but
    # not its attribute, and have no opposite, so style's sweep stays P3A vs P3B
    by_attr: dict[tuple[str, str], dict[int, str]] = {}
    for name in preferences:
        profile = psoups_profile(name)
        by_attr.setdefault((profile.dimension, profile.attribute), {})[int(profile.direction)] = name
    return {dim: (d[1], d[-1]) for (dim, _), d in by_attr.items() if 1 in d and -1 in d}


def sweep_weights(dims: dict[str, tuple[str, str]], dimension: str, t: float,
                  others: float = 0.5, alone: bool = False) -> dict[str, float]:
    """Soup weights with share ``t`` of ``dimension``'s mass on its attribute-raising
    preference; every other dimension split ``others`` / ``1 - others``. Sums to 1. ``alone``:
    the dimension's two preferences only, ``t`` and ``1 - t`` (the other dimensions left out)."""
    if alone:
        up, down = dims[dimension]
        return {up: t, down: 1.0 - t}
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
