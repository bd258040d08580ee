"""The soups report: one markdown file and its plots in ``<output_dir>/report/``."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from raypref import atomic
from raypref.experiments.soups import evaluate as ev
from raypref.eval.tables import wlt_markdown


def plot_sweep(sweep: dict, path: Path) -> Path:
    """Each attribute's judge score against the merge weight of the preference raising it."""
    fig, axes = plt.subplots(1, max(1, len(sweep)), figsize=(4.2 * max(1, len(sweep)), 3.4),
                             squeeze=False)
    for ax, (dim, row) in zip(axes[0], sweep.items()):
        ax.plot(row["weights"], row["scores"], marker="o")
        ax.set_title(f"{dim}: {'monotonic' if row['monotonic'] else 'NOT monotonic'}")
        ax.set_xlabel(f"share of {row['raised_by']} (vs {row['lowered_by']})")
        ax.set_ylabel(f"judge: {row['attribute']}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_win_rates(names: list[str], rates: np.ndarray, path: Path) -> Path:
    """Row method's aggregated win rate over the column method."""
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2.5, 1.1 * len(names) + 1.5))
    image = ax.imshow(rates, vmin=0, vmax=1, cmap="RdBu")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(rates[i, j]):
                ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center")
    ax.set_title("aggregated win rate (%) of row over column")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def write_report(out: Path, *, cfg, sweep: dict, comparison, accuracy: list[dict],
                 failed: dict[str, str], excluded: list, reused: list[str],
                 registered: list[str], n_prompts: int, timings: dict[str, float],
                 samples: dict[str, list[str]], n_sweep_prompts: int | None = None) -> Path:
    """Write report.md + plots + results.json; return the report path."""
    folder = Path(out) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    c = comparison
    if cfg.eval.text_judges:
        judge = (f"the text judges (verbosity = words / {cfg.eval.verbosity_words:g}, expertise = "
                 "Flesch–Kincaid grade / 20, friendliness = VADER compound in −1..1; quality = "
                 "relevance × (1 − repetition) × fluency gate under the frozen base, 0..1)")
    elif cfg.eval.judge_model:
        judge = f"LM judge `{cfg.eval.judge_model}` in scoring mode"
    else:
        judge = "the simulated world's judges"
    if cfg.psoups_files:
        pairs = "each preference's file"
    elif cfg.pairs_source == "pool":
        pairs = (f"the shared candidate pool of `{cfg.pool.model}`'s answers, labelled by the text "
                 f"judges with label noise {cfg.label_noise:g}, the same pairs for every arm"
                 + (f"; answers judged below quality {cfg.pool.min_quality:g} never paired"
                    if cfg.pool.min_quality else ""))
    else:
        pairs = "the simulated world, the same candidates for every arm"
    lines = ["# Personalized Soups report", ""]
    lines += [f"Method: P-Soups, per-preference trainer `{cfg.algo}`, merge "
              f"`{cfg.merge_method}`; {len(cfg.preferences)} preferences, "
              f"{len(cfg.combinations)} combinations, {cfg.seeds} training seed(s), "
              f"{n_prompts} held-out prompts × {cfg.eval.samples_per_prompt} samples, "
              f"judged by {judge}. Pairs ({cfg.pairs_per_preference} per policy): {pairs}.",
              f"Training (every policy): {timings['train_seconds']:.0f} s; "
              f"whole job: {timings['total_seconds']:.0f} s.", ""]
    if cfg.eval.judge_model == "tiny":
        lines += ["**Caution:** the tiny judge is an untrained model: its scores check the "
                  "machinery, they are not a result.", ""]
    if reused:
        lines += [f"Reused finished runs (not retrained): {', '.join(reused)}.", ""]
    if failed or excluded:
        lines += ["## Failed runs and the combinations left out", ""]
        lines += [f"- **{name}**: {cause}" for name, cause in failed.items()]
        lines += ["", "Left out of every win rate and table (a soup without one of its "
                  "preferences is not that combination): "
                  + (", ".join("+".join(combo) for combo in excluded) or "none") + "."
                  + (" P-MORL is left out too (a seed of it failed)."
                     if any(n.startswith("P-MORL-") for n in failed) else ""),
                  "A rerun with the same config retrains only the failed runs.", ""]

    lines += ["## General quality (P-Soups Fig. 2)", "",
              "Mean quality judge score per arm (0..1) and its quality win rate over SFT.", "",
              "| arm | mean quality | quality win rate vs SFT |", "|---|---|---|"]
    lines += [f"| {name} | {q:.3f} | {_pct(c.quality_vs_sft.get(name))} |"
              for name, q in c.quality.items()]
    lines += [""] + ([f"- **quality drop**: {line}" for line in c.quality_lines] or
                     [f"No arm falls below SFT's quality by more than {cfg.eval.quality_margin:g}."])
    lines += [""]

    sweep_sft = next(iter(sweep.values()), {}).get("sft_quality", c.quality["SFT"])
    design = ev.sweep_design(cfg.eval)
    sweep_design = ("" if (n_sweep_prompts or n_prompts, design.samples_per_prompt)
                    == (n_prompts, cfg.eval.samples_per_prompt) else
                    f", both judged on the sweep's own {n_sweep_prompts or n_prompts} held-out "
                    f"prompts × {design.samples_per_prompt} samples")
    lines += ["## Merge weight vs judged attribute", "",
              "Each dimension's share moves from the preference lowering its attribute (0) to "
              "the one raising it (1); " + ("the soup holds that dimension's two policies alone. "
                                           if cfg.eval.sweep_alone else
                                           "the other dimensions stay at 50/50. ") + "Means over seeds. "
              "Monotone = the attribute rises at every step AND quality stays within "
              f"{cfg.eval.quality_margin:g} of SFT's ({sweep_sft:.3f}{sweep_design}).", "",
              "| dimension | attribute | " + " | ".join(f"w={w:g}" for w in cfg.eval.weight_grid)
              + " | quality along the sweep | rises | quality holds | monotone |",
              "|---|---|" + "---|" * (len(cfg.eval.weight_grid) + 4)]
    for dim, row in sweep.items():
        lines.append(f"| {dim} | {row['attribute']} | "
                     + " | ".join(f"{v:.3f}" for v in row["scores"])
                     + " | " + ", ".join(f"{q:.3f}" for q in row["quality"])
                     + f" | {'yes' if row['rises'] else 'no'} | {'yes' if row['quality_holds'] else 'no'}"
                     + f" | {'yes' if row['monotonic'] else 'NO'} |")
    noisy = {dim: row for dim, row in sweep.items() if "intervals" in row}
    if noisy:
        lines += ["", "Sampling noise: each weight's 95% bootstrap interval over prompts (the same "
                  "resampled prompts at every weight), and the share of resamples in which the "
                  "attribute rises at every step.", "",
                  "| dimension | " + " | ".join(f"w={w:g}" for w in cfg.eval.weight_grid)
                  + " | rises in |", "|---|" + "---|" * (len(cfg.eval.weight_grid) + 1)]
        lines += [f"| {dim} | " + " | ".join(f"[{lo:.3f}, {hi:.3f}]" for lo, hi in row["intervals"])
                  + f" | {100 * row['p_rises']:.0f}% |" for dim, row in noisy.items()]
    matched = {dim: row for dim, row in sweep.items() if "quality_matched" in row}
    if matched:
        lines += ["", "The quality judge may lean with an attribute (on real text it rises with words "
                  "and reading grade), so the same sweeps' quality is also compared with SFT's at "
                  "the same attribute level: each point's quality minus what the base's own answers "
                  "(the candidate pool) gain or lose in judged quality between SFT's attribute level "
                  "and the point's.", "",
                  "| dimension | quality at matched attribute | holds | monotone |", "|---|---|---|---|"]
        lines += [f"| {dim} | " + ", ".join(f"{q:.3f}" for q in row["quality_matched"])
                  + f" | {'yes' if row['quality_holds_matched'] else 'no'}"
                  + f" | {'yes' if row['monotonic_matched'] else 'NO'} |" for dim, row in matched.items()]
    if sweep:
        plot_sweep(sweep, folder / "sweep.png")
        lines += ["", "![weight sweep](sweep.png)", ""]

    if c.names:
        lines += ["## Aggregated win rates (P-Soups §E.1, ties excluded)", "",
                  "Cells: win rate of the row over the column in % with its bootstrap "
                  f"{100 * next(iter(c.intervals.values())).level:.0f}% interval over prompts "
                  "and seeds, then wins/losses/ties; Avg.: the row's mean win rate over the "
                  "other columns (P-Soups Table 2).", "",
                  "| row vs column | " + " | ".join(c.names) + " | Avg. |",
                  "|---|" + "---|" * (len(c.names) + 1)]
        for row_name in c.names:
            cells = []
            for col_name in c.names:
                if row_name == col_name:
                    cells.append("–")
                    continue
                i = c.intervals[(row_name, col_name)]
                cells.append(f"{i.text()} ({i.wins}/{i.losses}/{i.ties})")
            lines.append(f"| {row_name} | " + " | ".join(cells) + f" | {_pct(c.averages[row_name])} |")
        plot_win_rates(c.names, c.rates, folder / "win_rates.png")
        lines += ["", "![win rates](win_rates.png)", ""]
        if c.wlt:
            lines += ["## P-Soups per combination (P-Soups Table 6: W/L/T)", "", wlt_markdown(c.wlt), ""]
        if c.criteria:
            prefs = sorted({p for rates in c.criteria.values() for p in rates})
            lines += ["## Criteria-wise win rate of P-Soups (P-Soups §E.3)", "",
                      "Per preference: the mean, over the combinations containing it, of "
                      "P-Soups' win rate on that preference's criterion alone.", "",
                      "| P-Soups vs | " + " | ".join(prefs) + " |", "|---|" + "---|" * len(prefs)]
            lines += [f"| {name} | " + " | ".join(_pct(rates.get(p)) for p in prefs) + " |"
                      for name, rates in c.criteria.items()]
            lines += [""]
    else:
        lines += ["## Aggregated win rates", "", "No combination was left to compare.", ""]

    lines += ["## Held-out implicit-reward accuracy per preference", "",
              "| preference | accuracy (mean over seeds) | per seed | mean margin |", "|---|---|---|---|"]
    for pref in accuracy[0] if accuracy else []:
        accs = [a[pref]["reward_accuracy"] for a in accuracy]
        margins = [a[pref]["reward_margin"] for a in accuracy]
        lines.append(f"| {pref} | {np.mean(accs):.3f} | {', '.join(f'{x:.3f}' for x in accs)} "
                     f"| {np.mean(margins):.3f} |")
    lines += ["", "## Merged models (seed 0)", ""]
    registry = " and registered in the MLflow model registry" if cfg.register_models else ""
    lines += [f"- `{name}`: safetensors in `merged/{name}`{registry}" for name in registered]
    lines += ["", "## Sample generations (seed 0)", ""]
    for name, texts in samples.items():
        lines.append(f"**{name}**")
        lines += [f"> {t}" for t in texts] + [""]
    path = folder / "report.md"
    atomic.write_text(path, "\n".join(lines) + "\n")
    atomic.write_text(folder / "results.json", json.dumps({
        "sweep": sweep,
        "win_rates": {f"{a} vs {b}": {"estimate": i.estimate, "low": i.low, "high": i.high,
                                      "wins": i.wins, "losses": i.losses, "ties": i.ties}
                      for (a, b), i in c.intervals.items()},
        "average_win_rates": c.averages, "criteria": c.criteria, "quality": c.quality,
        "quality_vs_sft": c.quality_vs_sft, "quality_drops": c.quality_lines,
        "accuracy": accuracy, "failed": failed, "excluded": ["+".join(x) for x in excluded],
        "reused": reused, "timings": timings}, indent=2, default=str))
    return path
