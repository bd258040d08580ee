"""The tables of seed 002 from win-rate results: per-combination W/L/T (Table 6, Fig. 3),
each method's average over its opponents (the Avg. column of Tables 2-3) and the
criteria-wise win rate (§E.3, Fig. 6)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from raypref.eval.winrate import (Combination, MethodScores, PreferenceTable, WinRate,
                                  dimension_outcome)


def combination_label(combo: Combination) -> str:
    """("P1A", "P2B", "P3A") -> "ABA" (the letters of 002 Table 4)."""
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


def average_win_rates(names: Sequence[str], rates: np.ndarray) -> dict[str, float | None]:
    """Each row method's mean win rate over the other methods (the Avg. column of 002
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
    """002 §E.3: for each preference, the mean over the combinations containing it of A's win
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
