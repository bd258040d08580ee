"""What the policy jobs on the simulated world (PPO, P-DPO, RSF) share: the world a job's SFT
settings name, and the check that a generation budget lets the verbosity judge read length."""
from __future__ import annotations

import math

from raypref.data.world import World


def job_world(cfg) -> World:
    """The world a policy job's SFT settings name."""
    return World.from_config(cfg.sft)


def check_length_reach(world: World, attributes, max_new_tokens: int, where: str) -> None:
    """Refuse a generation budget the verbosity judge cannot tell apart: it reads 0 below the word
    count of a typical one-sentence response and 1 at a six-sentence one, so with fewer new tokens
    than the latter every sample scores alike and nothing is learned (this bit PPO and RSF)."""
    if "verbosity" not in attributes:
        return
    zero, one = world.verbosity_words()
    if max_new_tokens < one:  # a word is at least one token
        raise ValueError(f"{where}.max_new_tokens={max_new_tokens}: too few for the verbosity judge, which "
                         f"reads 0 below {zero:.0f} words and 1 at {one:.0f}; use at least {math.ceil(one)}")
