"""From judged scores of every seed to the numbers of the report (pure: no models, no files).

Win rates pooled over seeds with bootstrap intervals over prompts and seeds (P-Soups Table 2 with
intervals), each method's average win rate, the per-combination W/L/T table of P-Soups against
every other arm (P-Soups Table 6), the criteria-wise win rate (P-Soups §E.3), mean general quality per
arm against SFT's (P-Soups Fig. 2), and the weight sweep averaged over seeds with its quality.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from raypref.eval.intervals import Interval, prompt_groups, sweep_bootstrap, win_rate_intervals
from raypref.eval.quality import (QUALITY_KEY, attribute_matched_quality, quality_drops, quality_holds,
                                  quality_win_rate)
from raypref.eval.tables import (
    WLTRow,
    average_win_rates,
    concat_seeds,
    criteria_win_rates,
    wlt_rows,
)
from raypref.eval.winrate import WinRate, win_rate_matrix
from raypref.experiments.soups.evaluate import is_monotonic

SOUPS = "P-Soups"


@dataclass
class Comparison:
    names: list[str] = field(default_factory=list)
    rates: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    details: dict[tuple[str, str], WinRate] = field(default_factory=dict)
    intervals: dict[tuple[str, str], Interval] = field(default_factory=dict)
    averages: dict[str, float | None] = field(default_factory=dict)
    wlt: list[WLTRow] = field(default_factory=list)
    criteria: dict[str, dict[str, float | None]] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)          # mean per arm (+ "SFT")
    quality_vs_sft: dict[str, float | None] = field(default_factory=dict)  # quality win rate
    quality_lines: list[str] = field(default_factory=list)


def compare(methods_per_seed: list[dict], sft_per_seed: list[list[dict]], table: dict,
            n_prompts: int, samples_per_prompt: int, *, tol: float, margin: float,
            n_boot: int = 2000, seed: int = 0) -> Comparison:
    """``methods_per_seed[k]``: {method: {combination: scores per row}} of seed k (every seed
    the same methods and combinations); ``sft_per_seed[k]``: SFT's scores of seed k on the bare
    prompts, the quality reference whether or not SFT is an arm."""
    out = Comparison()
    sft_rows = [row for rows in sft_per_seed for row in rows]
    out.quality["SFT"] = float(np.mean([r["quality"] for r in sft_rows]))
    if not methods_per_seed or not methods_per_seed[0] or \
            not next(iter(methods_per_seed[0].values())):
        return out  # no combination left to compare (every one had a failed preference)
    names = list(methods_per_seed[0])
    pooled = {name: concat_seeds([m[name] for m in methods_per_seed]) for name in names}
    out.names, out.rates, out.details = win_rate_matrix(pooled, table, tol)
    out.intervals = win_rate_intervals(
        methods_per_seed, table, prompt_groups(n_prompts, samples_per_prompt), tol=tol,
        n_boot=n_boot, seed=seed)
    out.averages = average_win_rates(out.names, out.rates)
    others = [n for n in names if n != SOUPS]
    if SOUPS in names:
        out.wlt = wlt_rows(out.details, [(SOUPS, n) for n in others])
        out.criteria = {n: criteria_win_rates(pooled[SOUPS], pooled[n], table, tol)
                        for n in others if not n.startswith(SOUPS)}
    sft_by_combo = {c: [row for rows in sft_per_seed for row in rows] for c in pooled[names[0]]}
    for name in names:
        out.quality[name] = float(np.mean([r["quality"] for rows in pooled[name].values()
                                           for r in rows]))
        if name != "SFT":
            out.quality_vs_sft[name] = quality_win_rate(pooled[name], sft_by_combo, tol).rate
    out.quality_lines = quality_drops(out.quality, "SFT", margin)
    return out


def sweep_over_seeds(per_seed: list[dict], sft_quality: float, margin: float,
                     reference: Mapping[str, Sequence[float]] | None = None, *,
                     n_prompts: int = 0, n_boot: int = 2000, seed: int = 0) -> dict:
    """The weight sweep of every dimension averaged over seeds; "monotonic" only when the
    attribute rises strictly with the weight AND quality holds along it (within ``margin``
    of SFT's).

    ``reference``: the base's own judged answers ({attribute: values, "quality": values}, e.g.
    the candidate pool's, in the scorer's units). With it, each sweep whose seeds kept their
    answers' attribute values also gets "quality_matched" (`attribute_matched_quality`: quality
    against SFT's at the same attribute level, for a judge that leans with the attribute),
    "quality_holds_matched" and "monotonic_matched".

    ``n_prompts``: the prompts each seed's answers cycle over; with it (and the answers' values)
    each sweep gets "intervals" (per weight, over prompts) and "p_rises", the share of
    bootstrap resamples in which the attribute rises at every step (`sweep_bootstrap`)."""
    out = {}
    for dim, first in per_seed[0].items():
        scores = np.mean([s[dim]["scores"] for s in per_seed], axis=0).tolist()
        quality = np.mean([s[dim]["quality"] for s in per_seed], axis=0).tolist()
        rises = is_monotonic(scores, increasing=True)
        holds = quality_holds(quality, sft_quality, margin)
        out[dim] = {**{k: first[k] for k in ("attribute", "raised_by", "lowered_by", "weights")},
                    "scores": scores, "quality": quality, "rises": rises,
                    "quality_holds": holds, "monotonic": rises and holds, "sft_quality": sft_quality,
                    "per_seed": [s[dim]["scores"] for s in per_seed]}
        key = first["attribute"]
        answers = all("answer_values" in s[dim] for s in per_seed)
        if n_prompts and answers:
            rows = [sum((list(s[dim]["answer_values"][i]) for s in per_seed), [])
                    for i in range(len(first["weights"]))]
            groups = np.concatenate([prompt_groups(n_prompts, len(s[dim]["answer_values"][0]) // n_prompts)
                                     for s in per_seed])
            intervals, p_rises = sweep_bootstrap(rows, groups, n_boot=n_boot, seed=seed)
            out[dim].update(intervals=intervals, p_rises=p_rises)
        if reference and key in reference and answers:
            matched = np.mean([attribute_matched_quality(
                s[dim]["quality"], s[dim]["answer_values"], s[dim]["sft_values"],
                reference[key], reference[QUALITY_KEY]) for s in per_seed], axis=0).tolist()
            holds_matched = quality_holds(matched, sft_quality, margin)
            out[dim].update(quality_matched=matched, quality_holds_matched=holds_matched,
                            monotonic_matched=rises and holds_matched)
    return out
