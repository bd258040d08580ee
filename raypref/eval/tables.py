"""The tables of P-Soups from win-rate results: per-combination W/L/T (Table 6, Fig. 3),
each method's average over its opponents (the Avg. column of Tables 2-3) and the
criteria-wise win rate (§E.3, Fig. 6)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from raypref.eval.winrate import (Combination, MethodScores, PreferenceTable, WinRate,
                                  dimension_outcome)


def combination_label(combo: Combination) -> str:
    """("P1A", "P2B", "P3A") -> "ABA" (the letters of P-Soups Table 4)."""
    return "".join(name[-1] for name in combo)


@dataclass(frozen=True)
class WLTRow:
    """One battle: W/L/T per combination and over all of them."""
    battle: str
    cells: dict[str, tuple[int, int, int]]
    total: WinRate


def wlt_rows(details: Mapping[tuple[str, str], WinRate],
             battles: Sequence[tuple[str, str]] | None = None) -> list[WLTRow]:
    """Rows of the per-combination table for ``battles`` (default: every pair in details)."""
    rows = []
    for pair in battles if battles is not None else list(details):
        if pair not in details:
            raise KeyError(f"wlt_rows: no result for battle {pair}; have {sorted(details)}")
        result = details[pair]
        cells = {combination_label(c): (r.wins, r.losses, r.ties)
                 for c, r in result.by_combination.items()}
        rows.append(WLTRow(f"{pair[0]} vs {pair[1]}", cells, result))
    return rows


def wlt_markdown(rows: Sequence[WLTRow]) -> str:
    """Markdown: one column per combination (W/L/T) and an "all" column (W/L/T, win rate)."""
    if not rows:
        return ""
    labels = list(rows[0].cells)
    lines = ["| battle | " + " | ".join(labels) + " | all | win rate |",
             "|---|" + "---|" * (len(labels) + 2)]
    for row in rows:
        t = row.total
        rate = "n/a" if t.rate is None else f"{100 * t.rate:.1f}%"
        lines.append(f"| {row.battle} | "
                     + " | ".join("{}/{}/{}".format(*row.cells.get(l, (0, 0, 0))) for l in labels)
                     + f" | {t.wins}/{t.losses}/{t.ties} | {rate} |")
    return "\n".join(lines)


def pool_win_rates(results: Sequence[WinRate]) -> WinRate:
    """One W/L/T result from several (e.g. one per training seed), summed per combination."""
    if not results:
        raise ValueError("pool_win_rates: no results")
    combos: dict[Combination, list[int]] = {}
    for result in results:
        for combo, r in result.by_combination.items():
            counts = combos.setdefault(combo, [0, 0, 0])
            counts[0], counts[1], counts[2] = counts[0] + r.wins, counts[1] + r.losses, counts[2] + r.ties
    by_combo = {c: WinRate(*counts) for c, counts in combos.items()}
    return WinRate(sum(r.wins for r in results), sum(r.losses for r in results),
                   sum(r.ties for r in results), by_combo)


def concat_seeds(per_seed: Sequence[MethodScores]) -> MethodScores:
    """One method's scores of several training seeds as one set of rows per combination
    (seed 0's rows, then seed 1's, ...), for `criteria_win_rates` over seeds."""
    if not per_seed:
        raise ValueError("concat_seeds: no seeds")
    combos = list(per_seed[0])
    for s, scores in enumerate(per_seed):
        if list(scores) != combos:
            raise ValueError(f"concat_seeds: seed {s} has combinations {list(scores)}, "
                             f"seed 0 has {combos}")
    return {c: [row for scores in per_seed for row in scores[c]] for c in combos}


def average_win_rates(names: Sequence[str], rates: np.ndarray) -> dict[str, float | None]:
    """Each row method's mean win rate over the other methods (the Avg. column of P-Soups
    Table 2); cells without a decisive comparison (NaN) are left out."""
    rates = np.asarray(rates, dtype=float)
    if rates.shape != (len(names), len(names)):
        raise ValueError(f"average_win_rates: rates has shape {rates.shape} for {len(names)} names")
    out = {}
    for i, name in enumerate(names):
        row = np.delete(rates[i], i)
        row = row[~np.isnan(row)]
        out[name] = float(row.mean()) if row.size else None
    return out


def criteria_win_rates(a: MethodScores, b: MethodScores, preferences: PreferenceTable,
                       tol: float = 0.0) -> dict[str, float | None]:
    """P-Soups §E.3: for each preference, the mean over the combinations containing it of A's win
    rate over B on that preference's criterion alone (wins / (wins + losses), ties left out).

    E.g. P1A averages the elementary-level win rates of AAA, AAB, ABA and ABB. None where no
    combination with the preference had a decisive outcome.
    """
    per_pref: dict[str, list[float]] = {}
    for combo in a:
        if combo not in b or len(a[combo]) != len(b[combo]):
            raise ValueError(f"criteria_win_rates: combination {combo} differs between A and B")
        for pref in combo:
            if pref not in preferences:
                raise KeyError(f"criteria_win_rates: preference {pref!r} is not in the table "
                               f"{sorted(preferences)}")
            key, direction = preferences[pref]
            outcomes = [dimension_outcome(sa[key], sb[key], direction, tol)
                        for sa, sb in zip(a[combo], b[combo])]
            wins, losses = outcomes.count(1), outcomes.count(-1)
            per_pref.setdefault(pref, [])
            if wins + losses:
                per_pref[pref].append(wins / (wins + losses))
    return {p: float(np.mean(v)) if v else None for p, v in per_pref.items()}
