"""Policy optimization jobs on the simulated world: PPO (``jobs/ppo.py``) and P-DPO (``jobs/pdpo.py``).

PPO of one policy against a P-Soups preference's world judge:

1. the SFT base (cached by config hash) or a given base policy;
2. PPO through the Ray Train + DeepSpeed runner (actor + critic trainable, reference + reward
   frozen), checkpoints and resume by run name;
3. the judged reward of the base and of the trained policy on held-out prompts (same sampling);
4. summary.json + MLflow metrics (per step: reward, KL, losses) and the summary artifact.

P-DPO / P-IPO on the length-conflict population: per-user accuracy, Accuracy-top / generic and
the minority ("shorter") group's accuracy from the spec's evaluation at the last step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from raypref.config import check_fields
from raypref.experiments.run import (SUMMARY_FILE, Experiment, JobResult, PolicyRunConfig, Run,
                                     run_experiment)
from raypref.data.users import psoups_profile
from raypref.data.world import World
from raypref.models.factory import LoraSettings, generate, load_pretrained
from raypref.models.user_model import UserModelConfig
from raypref.recipes.pdpo import PDPOSpec
from raypref.recipes.ppo import PPOConfig, preference_policy
from raypref.rewards.world import WeightedJudgeReward
from raypref.train.runner import Optimization, Resources


def _ppo_resources() -> Resources:
    return Resources(num_workers=1, cpus_per_worker=1.0, zero_stage=0, checkpoint_every=16)


@dataclass
class PPOJobConfig(PolicyRunConfig):
    """PPO of a LoRA policy whose reward is one P-Soups preference judged by the simulated world."""

    preference: str = "P3A"  # P1A..P3B (P3C/P3D need the extra-styles world): its attribute is the reward
    output_dir: str = "outputs/ppo"
    run_name: str = ""  # "" = ppo-<preference>; an existing name resumes that run
    n_prompts: int = 256  # training prompts drawn from the world
    eval_prompts: int = 32  # held-out prompts judged before and after
    training: PPOConfig = field(default_factory=PPOConfig)
    resources: Resources = field(default_factory=_ppo_resources)

    def validate(self) -> None:
        psoups_profile(self.preference)  # an unknown name raises, listing the known ones
        self.validate_run("PPOJobConfig")
        self.training.validate("PPOJobConfig.training")
        self.resources.validate("PPOJobConfig.resources")
        check_fields("PPOJobConfig", self, [("n_prompts", self.n_prompts >= 1, "must be >= 1"),
                                            ("eval_prompts", self.eval_prompts >= 1, "must be >= 1")])


def judged_reward(world: World, reward: WeightedJudgeReward, model, tokenizer, prompts: list[str],
                  max_new_tokens: int, seed: int) -> float:
    """Mean reward of sampled responses (temperature 1, fixed seed: base and policy alike)."""
    responses = generate(model, tokenizer, prompts, max_new_tokens, greedy=False, seed=seed)
    return float(reward.score(prompts, responses).mean())


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


def job_world(cfg) -> World:
    """The world a policy job's SFT settings name."""
    return World.from_config(cfg.sft)


class PPOExperiment(Experiment):
    job = "ppo"

    def run_name(self, cfg: PPOJobConfig) -> str:
        return cfg.run_name or f"ppo-{cfg.preference}"

    def prepare(self, run: Run) -> None:
        cfg = run.cfg
        run.data["world"] = world = job_world(cfg)
        check_length_reach(world, [psoups_profile(cfg.preference).attribute], cfg.training.max_new_tokens,
                           "PPOJobConfig.training")

    def spec(self, run: Run):
        cfg = run.cfg
        prompts = run.data["world"].prompts(cfg.n_prompts)
        return preference_policy(cfg.training, run.base_dir, cfg.preference, [_Prompt(p) for p in prompts],
                                 cfg.seed, world_seed=cfg.sft.world_seed)

    def runner_config(self, run: Run):
        return replace(super().runner_config(run), log_every=max(1, run.cfg.training.steps // 8))

    def evaluate(self, run: Run, result) -> dict:
        from peft import PeftModel

        cfg, world = run.cfg, run.data["world"]
        reward = run.spec.reward_factory()
        held_out = world.prompts(cfg.eval_prompts, split="test")
        base, tokenizer = load_pretrained(run.base_dir)
        before = judged_reward(world, reward, base.eval(), tokenizer, held_out,
                               cfg.training.max_new_tokens, cfg.seed)
        policy = PeftModel.from_pretrained(load_pretrained(run.base_dir)[0], str(result.export_path)).eval()
        after = judged_reward(world, reward, policy, tokenizer, held_out, cfg.training.max_new_tokens, cfg.seed)
        return {"heldout_reward_base": before, "heldout_reward_policy": after}

    def summary(self, run: Run, result, evaluation: dict) -> dict:
        rows = result.metrics
        k = max(1, len(rows) // 4)
        return {"preference": run.cfg.preference, "reward": run.spec.policy_info()["reward"],
                "train_reward_first_quarter": sum(r["reward/score"] for r in rows[:k]) / k,
                "train_reward_last_quarter": sum(r["reward/score"] for r in rows[-k:]) / k,
                "kl_per_response_last": rows[-1]["kl/per_response"] if rows else None, **evaluation}

    def report(self, result: JobResult) -> None:
        s = result.summary
        print(f"[ppo] {s['preference']} reward {s['reward']}: training reward "
              f"{s['train_reward_first_quarter']:.3f} (first quarter) -> {s['train_reward_last_quarter']:.3f} "
              f"(last quarter), KL/response {s['kl_per_response_last']:.3f}")
        print(f"[ppo] held-out judged reward: base {s['heldout_reward_base']:.3f} -> "
              f"policy {s['heldout_reward_policy']:.3f}")
        _report_paths("ppo", result)


def _report_paths(job: str, result: JobResult) -> None:
    print(f"[{job}] policy: {result.policy_dir}")
    print(f"[{job}] summary: {result.output_dir / SUMMARY_FILE}; MLflow run {result.run_id} in "
          f"{result.tracking_uri}")


def train_ppo(cfg: PPOJobConfig) -> JobResult:
    return run_experiment(PPOExperiment(), cfg)


@dataclass(frozen=True)
class _Prompt:
    """A prompt in the shape the per-preference builder reads prompts from (records' .prompt)."""

    prompt: str


# ---------------------------------------------------------------- P-DPO on the length conflict

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

    def validate(self) -> None:
        self.validate_run("PDPOJobConfig")
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

    def spec(self, run: Run) -> PDPOSpec:
        cfg = run.cfg
        train, held_out, groups = length_conflict_data(cfg, job_world(cfg))
        run.data["groups"] = groups
        print(f"[pdpo] {len(train)} train pairs from {cfg.n_annotators} annotators, {len(held_out)} held-out "
              f"pairs (+{cfg.unseen_annotators} unseen annotators); base {run.base_dir}", flush=True)
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
                "groups": dict(run.data["groups"])}

    def report(self, result: JobResult) -> None:
        s = result.summary
        users = " ".join(f"{u}({s['groups'][u][0]}):{_pct(a)}" for u, a in s["per_user"].items())
        print(f"[pdpo] user_model={s['user_model']} loss={s['loss']} alpha={s['alpha']} steps={s['steps']}")
        print(f"[pdpo] per annotator (l = longer, s = shorter): {users}")
        print(f"[pdpo] Accuracy-top {_pct(s['accuracy_top'])}  generic {_pct(s['accuracy_generic'])}  "
              f"minority (shorter) {_pct(s['accuracy_minority'])}  majority (longer) "
              f"{_pct(s['accuracy_majority'])}")
        _report_paths("pdpo", result)


def train_pdpo(cfg: PDPOJobConfig) -> JobResult:
    return run_experiment(PDPOExperiment(), cfg)
