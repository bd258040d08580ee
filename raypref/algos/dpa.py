"""Directional Preference Alignment (DPA §2.2, §3.1), the pure parts: preference directions,
best-of-n selection by ``v·r``, the system prompt that states ``v``, and the data schedule of the
iterative rejection-sampling fine-tuning (alternating prompt halves, a replay share of original data).

A direction is a unit vector over the reward objectives. With two objectives (helpfulness,
verbosity) the paper samples ``arctan(v2/v1) ~ Uniform(−π/4, 0)``: from (1, 0) to (√2/2, −√2/2).
With more objectives we sample uniformly on the part of the unit sphere whose coordinates have
the given signs (|N(0, I)| normalized, times the signs).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

DEFAULT_ANGLES = (-math.pi / 4, 0.0)


def sample_directions(n: int, n_objectives: int = 2, angle_range: tuple[float, float] = DEFAULT_ANGLES,
                      signs: Sequence[float] | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` unit directions ``[n, n_objectives]``.

    Two objectives: angle ``arctan(v2/v1)`` uniform in ``angle_range`` (within (−π/2, π/2), so
    v1 > 0). More: uniform on the orthant of the unit sphere given by ``signs`` (default all +).
    """
    if n < 1 or n_objectives < 2:
        raise ValueError(f"sample_directions: n={n} and n_objectives={n_objectives} must be >= 1 and >= 2")
    if n_objectives == 2 and signs is None:
        low, high = angle_range
        if not -math.pi / 2 < low <= high < math.pi / 2:
            raise ValueError(f"angle_range={angle_range}: need −π/2 < low <= high < π/2")
        angles = low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)
        return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1).float()
    signs = torch.tensor(list(signs) if signs is not None else [1.0] * n_objectives, dtype=torch.float64)
    if signs.shape != (n_objectives,) or not bool(((signs == 1) | (signs == -1)).all()):
        raise ValueError(f"signs={signs.tolist()}: need {n_objectives} entries, each +1 or -1")
    g = torch.randn(n, n_objectives, generator=generator, dtype=torch.float64).abs()
    return (g / g.norm(dim=1, keepdim=True) * signs).float()


def directions_between(start: Sequence[float], end: Sequence[float], n: int) -> torch.Tensor:
    """``n`` unit directions evenly spaced in angle from ``start`` to ``end`` (2 objectives), e.g.
    the evaluation sweep from (1, 0) to (√2/2, −√2/2)."""
    if n < 2:
        raise ValueError(f"directions_between: n={n} must be >= 2")
    a0, a1 = math.atan2(start[1], start[0]), math.atan2(end[1], end[0])
    angles = torch.linspace(a0, a1, n, dtype=torch.float64)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=1).float()


def scalarize(directions: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """``R(x, v, y) = v·r(x, y)``: directions ``[B, k]``, rewards ``[B, n, k]`` -> ``[B, n]``."""
    if rewards.dim() != 3 or directions.shape != (rewards.shape[0], rewards.shape[2]):
        raise ValueError(f"directions {tuple(directions.shape)} must be [B, k] for rewards [B, n, k] "
                         f"{tuple(rewards.shape)}")
    return torch.einsum("bk,bnk->bn", directions.to(rewards.dtype), rewards)


def best_of_n(directions: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Index ``[B]`` of each prompt's best response by ``v·r`` (the first one on ties)."""
    return scalarize(directions, rewards).argmax(dim=1)


def direction_system_prompt(direction: Sequence[float], objectives: Sequence[str]) -> str:
    """The system prompt that states the direction, as in DPA Fig. 1, e.g.
    ``You are a helpful assistant. Your response should maximize weighted rating =
    helpfulness*0.8 - verbosity*0.6``. Weights are rounded to 2 decimals."""
    if len(direction) != len(objectives) or not objectives:
        raise ValueError(f"direction {list(direction)} and objectives {list(objectives)} differ in length")
    weights = [round(float(w), 2) + 0.0 for w in direction]  # + 0.0 turns -0.0 into 0.0
    rating = f"{'-' if weights[0] < 0 else ''}{objectives[0]}*{abs(weights[0]):g}"
    for name, w in zip(objectives[1:], weights[1:]):
        rating += f" {'-' if w < 0 else '+'} {name}*{abs(w):g}"
    return f"You are a helpful assistant. Your response should maximize weighted rating = {rating}"


def spelled(text: str) -> str:
    """``text`` with every digit and operator (``0-9 . * + - =``) as its own whitespace-separated
    token, so a word-level tokenizer can read the numbers of a direction system prompt."""
    out = "".join(f" {c} " if c.isdigit() or c in ".*+-=" else c for c in text)
    return " ".join(out.split())


def prompt_half(prompts: Sequence, iteration: int) -> list:
    """The half of the prompts used at ``iteration`` (1-based): odd iterations take the first
    half, even ones the second, so each iteration samples prompts the last policy never saw."""
    if iteration < 1:
        raise ValueError(f"iteration={iteration}: iterations count from 1")
    middle = len(prompts) // 2
    return list(prompts[:middle] if iteration % 2 == 1 else prompts[middle:])


def with_replay(selected: Sequence, original: Sequence, fraction: float, rng: random.Random) -> list:
    """``selected`` plus enough examples drawn from ``original`` that they make ``fraction`` of
    the result (DPA: about 15%), shuffled."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"replay fraction={fraction}: must be in [0, 1)")
    n_replay = round(len(selected) * fraction / (1.0 - fraction))
    if n_replay > len(original):
        raise ValueError(f"replay needs {n_replay} original examples, only {len(original)} given")
    mixed = list(selected) + rng.sample(list(original), n_replay)
    rng.shuffle(mixed)
    return mixed
