"""The reward job (``jobs/reward.py``): train a reward model on the simulated world's users and
report per-user accuracy.

    python jobs/reward.py --method bt|multi_objective|user_model|vae|few_shot [--sampling adaptive]
        [--contrastive 0] [--gradient pcgrad|mgda] [--data.population cluster]
        [--alpha 0.5 --conditioning head|soft_prompt --user_model.kind individual|cluster]
        [--data.difficulty 0.1] [--head_lr 1e-3] [--training.steps 200] [--freeze_query_encoder true] ...

Defaults: the two-user conflict (Liu 2025 §3.5.1) at world difficulty 0.1, the offline MiniLM
encoder (fine-tuned at lr 1e-4, the parts trained from scratch at 1e-3), Ray Train + DeepSpeed
on one worker. These are the issue-8 table's settings (jobs/reward_compare.py): at difficulty
0.1 the unconditional BT RM stays near 50% and VAE + contrastive reached 0.95, while the bare
VAE stayed at 0.50; so ``--method vae`` trains with the contrastive term (0.5) by default and
``--contrastive 0`` is the bare-VAE ablation. With every part at 1e-4 the plain VAE stayed at
chance even on the clean world.
The VAE's frozen demonstration embeddings are computed once per data config and cached under
output_dir. Per-user accuracy of every evaluation goes to MLflow with a curve plot; the model
(safetensors + its config) is registered there.

``--method few_shot`` trains nothing: it evaluates few-shot prompting of a causal LM
(``--few_shot.model.name_or_path``, the untrained tiny GPT-2 by default) with greedy
information-gain vs random demonstrations (Liu 2025 §3.3, `eval.few_shot`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from raypref import tracking
from raypref.config import config_hash, to_dict
from raypref.eval.few_shot import FewShotConfig, evaluate_few_shot
from raypref.experiments.run import Experiment, JobResult, Run, RunConfig, run_experiment
from raypref.recipes.reward import (LATENTS_FILE, RewardConfig, RewardSpec,
                                    precompute_demo_embeddings, precompute_query_embeddings)
from raypref.recipes.pool import ensure_pool, resolved
from raypref.recipes.reward_data import (POOL, WORLD, RewardDataConfig, build_pairs, judge_reference,
                                         population)
from raypref.train.runner import Resources


@dataclass
class RewardJobConfig(RunConfig, RewardConfig):
    data: RewardDataConfig = field(default_factory=lambda: RewardDataConfig(difficulty=0.1))
    head_lr: float = 1e-3
    resources: Resources = field(default_factory=lambda: Resources(eval_every=25))
    output_dir: str = "outputs/reward"
    run_name: str = ""  # "" = reward-<method>-<hash of the settings>
    few_shot: FewShotConfig = field(default_factory=FewShotConfig)  # --method few_shot only

    def validate(self) -> None:
        self.validate_run("RewardJobConfig")
        if self.method != "few_shot":
            super().validate()  # RewardConfig's checks
            self.resources.validate("resources")
            return
        self.data.validate()
        self.few_shot.validate()
        if self.eval_pairs_per_user < 1:
            raise ValueError(f"eval_pairs_per_user={self.eval_pairs_per_user}: must be >= 1")


def recipe_config(cfg: RewardJobConfig) -> RewardConfig:
    return RewardConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RewardConfig)})


def run_name(cfg: RewardJobConfig) -> str:
    """The run's name: its method and the hash of every setting but `restart`, so that a restart
    replaces the run it names."""
    if cfg.run_name:
        return cfg.run_name
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("restart", "run_name")}
    return f"reward-{cfg.method}-{config_hash(settings)}"


def demo_cache(cfg: RewardJobConfig) -> Path | None:
    """The frozen demonstration embeddings of this data + encoder, computed on first use."""
    if cfg.method != "vae" or cfg.freeze_query_encoder:
        return None  # a frozen query encoder caches every pair, the pool included, itself
    key = config_hash({"data": dataclasses.asdict(cfg.data),
                       "encoder": dataclasses.asdict(cfg.encoder)})
    path = Path(cfg.output_dir) / "cache" / f"demos-{key}.safetensors"
    if not path.exists():
        print(f"[reward] embedding demonstration pools once -> {path}", flush=True)
        precompute_demo_embeddings(recipe_config(cfg), path)
    return path


def query_cache(cfg: RewardJobConfig) -> Path | None:
    """A frozen query encoder's embeddings of every pair of this data + encoder, computed once
    and shared by every run on them (the arms and seeds of a comparison)."""
    if not cfg.freeze_query_encoder or cfg.method == "few_shot":
        return None
    key = config_hash({"data": dataclasses.asdict(cfg.data), "encoder": dataclasses.asdict(cfg.encoder),
                       "eval_pairs_per_user": cfg.eval_pairs_per_user})
    path = (Path(cfg.output_dir) / "cache" / f"queries-{key}.safetensors").resolve()
    if not path.exists():
        print(f"[reward] embedding every pair once (frozen encoder) -> {path}", flush=True)
        precompute_query_embeddings(recipe_config(cfg), path)
    return path


def plot_user_curves(history: list[dict], path: Path) -> Path | None:
    """Per-user evaluation accuracy against step (Liu 2025 figs. 8, 12)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in history if any(k.startswith("eval.acc.user") for k in r)]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted(k for k in rows[-1] if k.startswith("eval.acc.user")):
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=key[len("eval.acc."):])
    ax.set_xlabel("step"), ax.set_ylabel("test accuracy"), ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", lw=0.5)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_latent_tsne(latents_file: Path, users: dict[int, str], path: Path) -> Path | None:
    """t-SNE of the latent means at the first, middle and last evaluation (Liu 2025 fig. 15),
    coloured by user group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from safetensors.torch import load_file
    from sklearn.manifold import TSNE

    if not latents_file.exists():
        return None
    latents = load_file(str(latents_file))
    steps = sorted({int(k.split("/")[0][4:]) for k in latents})
    picked = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    fig, axes = plt.subplots(1, len(picked), figsize=(4 * len(picked), 4), squeeze=False)
    for ax, step in zip(axes[0], picked):
        keys = sorted(k for k in latents if k.startswith(f"step{step}/"))
        points = np.concatenate([latents[k].numpy() for k in keys])
        labels = [users[int(k.split("user")[1])] for k in keys for _ in range(len(latents[k]))]
        xy = TSNE(n_components=2, perplexity=min(30, len(points) - 1), init="pca",
                  random_state=0).fit_transform(points)
        for group in sorted(set(labels)):
            mask = np.array([g == group for g in labels])
            ax.scatter(xy[mask, 0], xy[mask, 1], s=8, label=group)
        ax.set_title(f"step {step}")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_few_shot(cfg: RewardJobConfig) -> dict:
    """Liu 2025 §3.3: no training; per-user accuracy of greedy vs random few-shot prompts."""
    name = f"reward-few_shot-{config_hash(cfg)}"
    with tracking.start_run("reward", cfg, Path(cfg.output_dir), run_name=name):
        final = evaluate_few_shot(cfg.few_shot, cfg.data, cfg.eval_pairs_per_user)
        tracking.log_metrics(final)
        tracking.log_dict({"final": final}, "reward_summary.json")
    print(f"[reward] {name}: " + " ".join(f"{k}={v:.3f}" for k, v in sorted(final.items())))
    return final


class RewardExperiment(Experiment):
    """A reward model: no base policy (the encoder is in the config); the runner trains the
    spec, then per-user curves, the world judge's reference accuracy and the model registry."""

    job = "reward"

    def run_name(self, cfg: RewardJobConfig) -> str:
        return run_name(cfg)

    def base_policy(self, run: Run) -> str:
        return ""

    def prepare(self, run: Run) -> None:
        data = run.cfg.data
        if data.source == POOL:  # generated (or resumed) and judged once, before any worker reads it
            pool = ensure_pool(data.pool)
            print(f"[reward] candidate pool {pool.folder}: {len(pool.candidates)} answers", flush=True)
        if data.source != WORLD:  # read once here, before Ray: wrong columns or too many bad rows stop now
            pairs = build_pairs(data)
            print(f"[reward] {data.source}{'' if data.source == POOL else f' ({data.schema})'}: {len(pairs)} user(s), "
                  f"{sum(len(up.train) for up in pairs.values())} train and "
                  f"{sum(len(up.test) for up in pairs.values())} test pairs", flush=True)

    def spec(self, run: Run) -> RewardSpec:
        cfg = run.cfg
        recipe = recipe_config(cfg)
        if recipe.data.source == POOL:  # the workers run in other folders: absolute paths (a copy:
            # the comparison's runs share cfg.data, and their names hash it)
            recipe.data = dataclasses.replace(recipe.data, pool=resolved(recipe.data.pool))
        return RewardSpec(recipe, demo_embeddings_path=str(demo_cache(cfg) or "") or None,
                          seed=cfg.seed, query_embeddings_path=str(query_cache(cfg) or "") or None)

    def evaluate(self, run: Run, result) -> dict:
        cfg, recipe = run.cfg, run.spec.cfg
        plot = plot_user_curves(result.metrics, run.out / "user-accuracy.png")
        if plot:
            tracking.log_artifact(plot)
        if result.export_path and cfg.method == "vae":
            groups = ({u.user_id: u.group for u in population(recipe.data)} if recipe.data.has_judge
                      else {uid: up.user.group for uid, up in run.spec.pairs.items()})
            tsne = plot_latent_tsne(Path(result.export_path) / LATENTS_FILE, groups, run.out / "latent-tsne.png")
            if tsne:
                tracking.log_artifact(tsne)
        if result.export_path:
            tracking.register_model_dir(result.export_path, f"raypref-reward-{cfg.method}")
        final = {k[len("eval."):]: v for k, v in result.metrics[-1].items() if k.startswith("eval.")}
        reference = (judge_reference(recipe.data, recipe.eval_pairs_per_user)
                     if recipe.data.has_judge else {})
        return {"final": final, "judge_reference": {"acc": reference}}

    def report(self, result: JobResult) -> None:
        s = result.summary
        print(f"[reward] {s['run_name']}: " + " ".join(f"{k}={v:.3f}" for k, v in sorted(s["final"].items())))
        reference = s["judge_reference"]["acc"]
        if reference:
            print("[reward] reference: the judges with each user's true weights, same pairs: "
                  + " ".join(f"acc.{k}={v:.3f}" for k, v in sorted(reference.items())))
        print(f"[reward] model: {result.policy_dir}")
        print(f"[reward] summary: {result.output_dir / 'summary.json'}; MLflow run {result.run_id} in "
              f"{result.tracking_uri}")


def train_reward(cfg: RewardJobConfig) -> JobResult:
    """One reward model trained, tracked and registered (summary["final"]: its last evaluation)."""
    return run_experiment(RewardExperiment(), cfg)


def run_reward_job(cfg: RewardJobConfig) -> JobResult | dict:
    """What ``jobs/reward.py`` runs: few-shot prompting (no training) or a trained reward model."""
    return run_few_shot(cfg) if cfg.method == "few_shot" else train_reward(cfg)
