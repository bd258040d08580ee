"""The soups report: one markdown file and its plots in ``<output_dir>/report/``."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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


def write_report(out: Path, *, cfg, sweep: dict, win_names: list[str], win_rates: np.ndarray,
                 win_details: dict, accuracy: dict, failed: dict[str, str],
                 registered: list[str], timings: dict[str, float],
                 samples: dict[str, list[str]]) -> Path:
    """Write report.md + plots + results.json; return the report path."""
    folder = Path(out) / "report"
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# Personalized Soups report", ""]
    lines += [f"Method: seed 002 (P-Soups), per-preference trainer `{cfg.algo}`, merge "
              f"`{cfg.merge_method}`; {len(cfg.preferences)} preferences, "
              f"{len(cfg.combinations)} combinations, {cfg.eval.n_prompts} held-out prompts × "
              f"{cfg.eval.samples_per_prompt} samples.",
              f"Training (all policies at once): {timings['train_seconds']:.0f} s; "
              f"whole job: {timings['total_seconds']:.0f} s.", ""]
    if cfg.psoups_files:
        lines += ["**Caution:** the policies were trained on real P-Soups files, but the prompts "
                  "and judges below are the simulated world's; treat the scores as a smoke check, "
                  "not a result.", ""]
    if failed:
        lines += ["## Failed runs (merged and evaluated without them)", ""]
        lines += [f"- **{name}**: {error}" for name, error in failed.items()] + [""]

    lines += ["## Merge weight vs judged attribute", "",
              "Each dimension's share moves from the preference lowering its attribute (0) to "
              "the one raising it (1); the other dimensions stay at 50/50.", "",
              "| dimension | attribute | " + " | ".join(f"w={w:g}" for w in cfg.eval.weight_grid)
              + " | monotonic |",
              "|---|---|" + "---|" * (len(cfg.eval.weight_grid) + 1)]
    for dim, row in sweep.items():
        lines.append(f"| {dim} | {row['attribute']} | "
                     + " | ".join(f"{v:.3f}" for v in row["scores"])
                     + f" | {'yes' if row['monotonic'] else 'NO'} |")
    if sweep:
        plot_sweep(sweep, folder / "sweep.png")
        lines += ["", "![weight sweep](sweep.png)", ""]

    lines += ["## Aggregated win rates (002 §E.1, ties excluded)", "",
              "| row vs column | " + " | ".join(win_names) + " |",
              "|---|" + "---|" * len(win_names)]
    for i, row_name in enumerate(win_names):
        cells = []
        for j, col_name in enumerate(win_names):
            if i == j:
                cells.append("–")
                continue
            d = win_details[(row_name, col_name)]
            rate = "n/a" if d.rate is None else f"{100 * d.rate:.1f}%"
            cells.append(f"{rate} ({d.wins}/{d.losses}/{d.ties})")
        lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: win rate (wins/losses/ties).", ""]
    plot_win_rates(win_names, win_rates, folder / "win_rates.png")
    lines += ["![win rates](win_rates.png)", ""]

    lines += ["## Held-out implicit-reward accuracy per preference", "",
              "| preference | accuracy | mean margin |", "|---|---|---|"]
    lines += [f"| {k} | {v['reward_accuracy']:.3f} | {v['reward_margin']:.3f} |"
              for k, v in accuracy.items()]
    lines += ["", "## Merged models", ""]
    registry = " and registered in the MLflow model registry" if cfg.register_models else ""
    lines += [f"- `{name}`: safetensors in `merged/{name}`{registry}" for name in registered]
    lines += ["", "## Sample generations", ""]
    for name, texts in samples.items():
        lines.append(f"**{name}**")
        lines += [f"> {t}" for t in texts] + [""]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (folder / "results.json").write_text(json.dumps({
        "sweep": sweep, "win_rates": {"names": win_names, "rates": np.where(
            np.isnan(win_rates), None, win_rates).tolist()},
        "accuracy": accuracy, "failed": failed, "timings": timings}, indent=2, default=str))
    return path
