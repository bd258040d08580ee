"""P-DPO / P-IPO on the simulated length conflict (``jobs/pdpo.py``): per-user accuracy,
Accuracy-top / generic and the minority ("shorter") group's accuracy from the spec's
evaluation at the last step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from raypref.config import check_fields
from raypref.data.source import PreferenceSource, read_source
from raypref.data.world import World
from raypref.experiments.run import Experiment, JobResult, PolicyRunConfig, Run, report_paths, run_experiment
from raypref.experiments.world import job_world
from raypref.models.factory import LoraSettings
from raypref.models.user_model import UserModelConfig
from raypref.recipes.pdpo import PDPOSpec
from raypref.train.runner import Optimization, Resources


USER_MODELS = ("none", "individual", "cluster")
LOSSES = {"dpo": "sigmoid", "ipo": "ipo"}


def _pdpo_training() -> Optimization:
    return Optimization(steps=150, micro_batch_size=8, lr=5e-4, warmup_steps=10)


def _pdpo_resources() -> Resources:
    return Resources(num_workers=1, cpus_per_worker=1.0, zero_stage=0, checkpoint_every=50, eval_every=50)


@dataclass
class PDPOJobConfig(PolicyRunConfig):
    """P-DPO / P-IPO on the simulated length conflict: 70% of annotators prefer longer
    responses, 30% shorter; a few more annotators are held out to measure the generic user."""

    user_model: str = "individual"  # none (vanilla DPO) | individual (e_0 + o_i) | cluster (V·w_i)
    loss: str = "dpo"  # dpo | ipo
    alpha: float = 0.5  # weight of the user term; 1 - alpha goes to the generic user 0
    n_tokens: int = 10  # T_u: user tokens in the soft prompt
    n_clusters: int = 5  # K, for user_model=cluster
    beta: float = 0.5
    use_user_text: bool = False  # also feed each pair's user text (none in the length conflict)
    # the user model's own peak rate (0 = training.lr). Adam moves a parameter ~lr a step, and a
    # cluster user's K weights must travel O(1): at the LoRA's 5e-4 the cluster model never split
    # the minority (18.8% after 150 steps), at 5e-2 it reaches 100% (jobs/pdpo.py, measured)
    user_lr: float = 5e-2
    n_annotators: int = 10  # seen in training (P-RLHF §5.1: 10)
    unseen_annotators: int = 10  # drawn with the same 70/30 split, never trained on (Accuracy-generic)
    pairs_per_user: int = 64
    eval_pairs_per_user: int = 16  # held-out prompts (the world's test split)
    population_seed: int = 0
    output_dir: str = "outputs/pdpo"
    run_name: str = ""  # "" = pdpo-<user_model>-<loss>; an existing name resumes that run
    max_length: int = 160
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16))
    training: Optimization = field(default_factory=_pdpo_training)
    resources: Resources = field(default_factory=_pdpo_resources)
    # your own pairs with users (--data.source f --data.user_column annotator, or --data.format
    # prism) in place of the simulated length conflict; its test_fraction is the held-out share
    data: PreferenceSource = field(default_factory=PreferenceSource)

    def validate(self) -> None:
        self.validate_run("PDPOJobConfig")
        self.data.validate("PDPOJobConfig.data")
        if self.data.source and not self.data.has_users:
            raise ValueError(f"PDPOJobConfig.data: P-DPO learns each user, and format {self.data.format!r} "
                             "names none here (trl: set data.user_column; prism names its users)")
        self.training.validate("PDPOJobConfig.training")
        self.resources.validate("PDPOJobConfig.resources")
        self.lora.validate("PDPOJobConfig.lora")
        checks = [("user_model", self.user_model in USER_MODELS, f"must be one of {USER_MODELS}"),
                  ("loss", self.loss in LOSSES, f"must be one of {tuple(LOSSES)}"),
                  ("alpha", 0.0 <= self.alpha <= 1.0, "must be in [0, 1]"),
                  ("n_tokens", self.n_tokens >= 1, "must be >= 1"),
                  ("n_clusters", self.n_clusters >= 1, "must be >= 1"),
                  ("beta", self.beta > 0, "must be > 0"),
                  ("user_lr", self.user_lr >= 0, "must be >= 0 (0 = training.lr)"),
                  ("n_annotators", self.n_annotators >= 2, "must be >= 2"),
                  ("unseen_annotators", self.unseen_annotators >= 0, "must be >= 0"),
                  ("pairs_per_user", self.pairs_per_user >= 1, "must be >= 1"),
                  ("eval_pairs_per_user", self.eval_pairs_per_user >= 1, "must be >= 1"),
                  ("max_length", self.max_length >= 8, "must be >= 8")]
        check_fields("PDPOJobConfig", self, checks)

    def user_model_config(self) -> UserModelConfig | None:
        if self.user_model == "none":
            return None
        return UserModelConfig(kind=self.user_model, n_tokens=self.n_tokens, n_clusters=self.n_clusters)


def length_conflict_data(cfg: PDPOJobConfig, world: World) -> tuple[list, list, dict[int, str]]:
    """(train pairs of the seen annotators, held-out pairs of seen + unseen annotators, groups)."""
    import numpy as np

    from raypref.data.simulate import simulate_population
    from raypref.data.users import length_conflict

    users = length_conflict(cfg.n_annotators + cfg.unseen_annotators, seed=cfg.population_seed)
    seen = users[:cfg.n_annotators]
    rng = np.random.default_rng([cfg.population_seed, 1])
    train = simulate_population(world, "length_conflict", seen, cfg.pairs_per_user, rng)
    held_out = simulate_population(world, "length_conflict", users, cfg.eval_pairs_per_user, rng, split="test")
    return train, held_out, {u.user_id: u.group for u in users}


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


class PDPOExperiment(Experiment):
    job = "pdpo"

    def run_name(self, cfg: PDPOJobConfig) -> str:
        return cfg.run_name or f"pdpo-{cfg.user_model}-{cfg.loss}"

    def prepare(self, run: Run) -> None:
        cfg = run.cfg
        if cfg.data.source:  # before the base: a source with the wrong columns stops here
            pairs = read_source(cfg.data, run.out, seed=cfg.seed, log=lambda m: print(f"[pdpo] {m}", flush=True))
            run.data["pairs"] = (pairs.train, pairs.test, {})  # no groups: acc/user_<id> per user
            run.data["quarantine"], run.data["users"] = pairs.quarantine, pairs.users

    def spec(self, run: Run) -> PDPOSpec:
        cfg = run.cfg
        train, held_out, groups = run.data.get("pairs") or length_conflict_data(cfg, job_world(cfg))
        run.data["groups"] = groups
        print(f"[pdpo] {len(train)} train pairs from {len({r.user_id for r in train})} annotators, "
              f"{len(held_out)} held-out pairs; base {run.base_dir}", flush=True)
        return PDPOSpec(run.base_dir, train, held_out, user_model=cfg.user_model_config(), alpha=cfg.alpha,
                        beta=cfg.beta, loss_type=LOSSES[cfg.loss], use_user_text=cfg.use_user_text,
                        lora=cfg.lora, user_lr=cfg.user_lr or None, groups=groups, max_length=cfg.max_length)

    def evaluate(self, run: Run, result) -> dict:
        """The spec's own evaluation at the last step (the runner evaluates before it ends)."""
        final = {k[len("eval."):]: v for k, v in result.metrics[-1].items() if k.startswith("eval.")}
        seen = set(run.spec.seen_users)
        return {"accuracy_top": final.get("acc/top"), "accuracy_generic": final.get("acc/generic"),
                "accuracy_minority": final.get("acc/group_shorter"),
                "accuracy_majority": final.get("acc/group_longer"),
                "per_user": {u: final[f"acc/user_{u}"] for u in sorted(seen) if f"acc/user_{u}" in final}}

    def summary(self, run: Run, result, evaluation: dict) -> dict:
        cfg = run.cfg
        return {"user_model": cfg.user_model, "loss": cfg.loss, "alpha": run.spec.alpha, **evaluation,
                "groups": dict(run.data["groups"]),
                **({"quarantine": run.data["quarantine"], "users": run.data["users"]} if "users" in run.data else {})}

    def report(self, result: JobResult) -> None:
        s = result.summary
        group = {u: f"({g[0]})" for u, g in s["groups"].items()}  # none for your own data's users
        users = " ".join(f"{u}{group.get(u, '')}:{_pct(a)}" for u, a in s["per_user"].items())
        print(f"[pdpo] user_model={s['user_model']} loss={s['loss']} alpha={s['alpha']} steps={s['steps']}")
        print(f"[pdpo] per annotator (l = longer, s = shorter): {users}")
        print(f"[pdpo] Accuracy-top {_pct(s['accuracy_top'])}  generic {_pct(s['accuracy_generic'])}  "
              f"minority (shorter) {_pct(s['accuracy_minority'])}  majority (longer) "
              f"{_pct(s['accuracy_majority'])}")
        report_paths("pdpo", result)


def train_pdpo(cfg: PDPOJobConfig) -> JobResult:
    return run_experiment(PDPOExperiment(), cfg)

