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

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from raypref import tracking
from raypref.config import check_fields
from raypref.experiments.run import (SUMMARY_FILE, Experiment, JobResult, PolicyRunConfig, Run,
                                     run_experiment)
from raypref.data.source import PreferenceSource, read_source
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
        _report_paths("pdpo", result)


def train_pdpo(cfg: PDPOJobConfig) -> JobResult:
    return run_experiment(PDPOExperiment(), cfg)


# ---------------------------------------------------------------- DPA rejection sampling

def _rsf_training() -> Optimization:
    return Optimization(steps=90, micro_batch_size=8, lr=5e-4, warmup_steps=5)


def _rsf_resources() -> Resources:
    return Resources(num_workers=1, cpus_per_worker=1.0, zero_stage=0, checkpoint_every=30)


@dataclass
class RSFJobConfig(PolicyRunConfig):
    """DPA: rejection-sampling fine-tuning on directions v over two objectives judged by
    the simulated world, with v written in the system prompt; then the direction sweep."""

    # DPA's helpfulness (the mean of the four UltraFeedback aspects, graded) and verbosity; the
    # world's single helpfulness rating moves in coarse steps, see recipes.rsf.DERIVED_OBJECTIVES
    objectives: list[str] = field(default_factory=lambda: ["overall_helpfulness", "verbosity"])
    n_samples: int = 8  # responses per (prompt, direction); the best by v·r is kept (DPA: 16)
    directions_per_prompt: int = 4  # DPA: 5
    prompts_per_iteration: int = 24
    steps_per_iteration: int = 30  # optimizer steps per iteration; training.steps / this = iterations
    replay_fraction: float = 0.15  # of each iteration's data: original (prompt, response) pairs
    max_new_tokens: int = 128  # the verbosity judge needs ~100 words to read 1 (check_length_reach)
    # verbosity as words / (words where the judge reads 1): the judge itself reads 0 below ~62
    # words, where the policy's answers fall, and gives v·r no length to trade (WorldObjectives)
    verbosity_by_length: bool = True
    # DPA's helpfulness reward grows with length (its premise for sampling only v2 <= 0); the
    # world's judge does not, and without it every direction rewards shorter answers and the
    # iterations shrink all of them alike. See rewards.world.WorldObjectives
    helpfulness_length_bias: float = 0.3
    # iteration 1 samples from the bare prompt: a small SFT base cannot follow the unseen direction
    # text (RSFSpec); false for a base that already follows system prompts, as DPA's does
    bare_first_iteration: bool = True
    max_length: int = 224
    n_prompts: int = 256  # training prompts (two halves, alternating by iteration)
    n_original: int = 1000  # original pairs to replay from (the world's SFT corpus)
    eval_directions: int = 4  # evenly spaced from (1, 0) to (√2/2, −√2/2)
    eval_prompts: int = 32  # held-out prompts per direction
    # sampled responses per held-out prompt and direction: one sample of 96 prompts read 43.9 vs 43.8
    # words for the last two directions, four read 44.1 vs 45.3 (not monotone)
    eval_samples: int = 4
    output_dir: str = "outputs/rsf"
    run_name: str = "rsf"  # an existing name resumes that run
    training: Optimization = field(default_factory=_rsf_training)
    resources: Resources = field(default_factory=_rsf_resources)

    def validate(self) -> None:
        from raypref.rewards.world import objective_ranges

        self.validate_run("RSFJobConfig")
        self.training.validate("RSFJobConfig.training")
        self.resources.validate("RSFJobConfig.resources")
        checks = [("objectives", len(self.objectives) == 2 and set(self.objectives) <= set(objective_ranges()),
                   f"must be two judged objectives of {sorted(objective_ranges())}"),
                  ("n_samples", self.n_samples >= 2, "must be >= 2"),
                  ("directions_per_prompt", self.directions_per_prompt >= 1, "must be >= 1"),
                  ("prompts_per_iteration", self.prompts_per_iteration >= 1, "must be >= 1"),
                  ("steps_per_iteration", self.steps_per_iteration >= 1, "must be >= 1"),
                  ("replay_fraction", 0.0 <= self.replay_fraction < 1.0, "must be in [0, 1)"),
                  ("helpfulness_length_bias", 0.0 <= self.helpfulness_length_bias < 1.0, "must be in [0, 1)"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                  ("n_prompts", self.n_prompts >= 2, "must be >= 2 (two halves)"),
                  ("n_original", self.n_original >= 1, "must be >= 1"),
                  ("eval_directions", self.eval_directions >= 2, "must be >= 2"),
                  ("eval_prompts", self.eval_prompts >= 1, "must be >= 1"),
                  ("eval_samples", self.eval_samples >= 1, "must be >= 1"),
                  ("run_name", bool(self.run_name) and "/" not in self.run_name, "must be a folder name")]
        check_fields("RSFJobConfig", self, checks)


def direction_sweep(model, tokenizer, world: World, objectives: list[str], directions, prompts: list[str],
                    max_new_tokens: int, seed: int, verbosity_by_length: bool = False,
                    helpfulness_length_bias: float = 0.0, samples: int = 1) -> list[dict]:
    """Per direction: mean response length (words) and mean judged objectives over ``samples``
    responses to each of ``prompts``, each prompt preceded by the direction's system prompt (the
    same sampling seeds for every direction)."""
    from raypref.recipes.rsf import spelled_direction
    from raypref.rewards.world import WorldObjectives, judge_objectives

    judge = WorldObjectives(objectives, world.seed, verbosity_by_length, helpfulness_length_bias)
    rows = []
    for v in directions:
        v = [round(float(x), 4) for x in v]
        queries = [f"{spelled_direction(v, objectives)} {p}" for p in prompts]
        responses = [r for k in range(samples)
                     for r in generate(model, tokenizer, queries, max_new_tokens, greedy=False, seed=seed + 7919 * k)]
        prompts_ = list(prompts) * samples
        raw = [judge_objectives(world, r, p) for p, r in zip(prompts_, responses)]
        rows.append({"direction": v, "length": sum(len(r.split()) for r in responses) / len(responses),
                     **{o: sum(s[o] for s in raw) / len(raw) for o in objectives},
                     "v_dot_r": float((judge.score_objectives(prompts_, responses) @ torch.tensor(v)).mean())})
    return rows


def rsf_reward_factory(cfg: RSFJobConfig):
    """What builds the job's frozen multi-objective reward (on each worker): the world's judges
    over ``cfg.objectives`` with the job's verbosity reading and helpfulness length bias."""
    from raypref.rewards.world import WorldObjectives

    return functools.partial(WorldObjectives, list(cfg.objectives), cfg.sft.world_seed,
                             verbosity_by_length=cfg.verbosity_by_length,
                             helpfulness_length_bias=cfg.helpfulness_length_bias)


class RSFExperiment(Experiment):
    job = "rsf"

    def prepare(self, run: Run) -> None:
        cfg = run.cfg
        run.data["world"] = world = job_world(cfg)
        check_length_reach(world, cfg.objectives, cfg.max_new_tokens, "RSFJobConfig")

    def spec(self, run: Run):
        import numpy as np

        from raypref.models.factory import extend_vocabulary, save_pretrained_safetensors
        from raypref.recipes.rsf import RSFSpec, spelled_direction

        cfg, world = run.cfg, run.data["world"]
        # v is written with digits: give a word-level tokenizer the tokens of the system prompt
        model, tokenizer = load_pretrained(run.base_dir)
        words = {w for v in ([1.0, -0.5], [0.25, 0.75]) for w in spelled_direction(v, cfg.objectives).split()}
        added = extend_vocabulary(model, tokenizer, sorted(words | set("0123456789")), seed=cfg.seed)
        base_dir = run.out / "base" if added else Path(run.base_dir)  # written once: a resumed run reuses it
        if added and not (base_dir / "config.json").exists():
            save_pretrained_safetensors(model, tokenizer, base_dir)
        run.data["extended_base"] = base_dir
        print(f"[rsf] base {run.base_dir}; {len(added)} tokens added for the direction prompt", flush=True)
        rng = np.random.default_rng([cfg.seed, 3])
        return RSFSpec(str(base_dir), world.prompts(cfg.n_prompts), world.sft_corpus(cfg.n_original, rng),
                       rsf_reward_factory(cfg),
                       objectives=list(cfg.objectives),
                       direction_text=functools.partial(spelled_direction, objectives=list(cfg.objectives)),
                       n_samples=cfg.n_samples, directions_per_prompt=cfg.directions_per_prompt,
                       prompts_per_iteration=cfg.prompts_per_iteration,
                       steps_per_iteration=cfg.steps_per_iteration, replay_fraction=cfg.replay_fraction,
                       max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length,
                       bare_first_iteration=cfg.bare_first_iteration)

    def runner_config(self, run: Run):
        return replace(super().runner_config(run), log_every=max(1, run.cfg.steps_per_iteration // 2))

    def evaluate(self, run: Run, result) -> dict:
        """The direction sweep on held-out prompts, of the base and of the policy."""
        from raypref.algos.dpa import directions_between

        cfg, world = run.cfg, run.data["world"]
        directions = directions_between((1.0, 0.0), (math.sqrt(0.5), -math.sqrt(0.5)), cfg.eval_directions)
        held_out = world.prompts(cfg.eval_prompts, split="test")
        sweeps = {}
        for label, folder in (("base", run.data["extended_base"]), ("policy", result.export_path)):
            policy, policy_tokenizer = load_pretrained(folder)
            sweeps[label] = direction_sweep(policy.eval(), policy_tokenizer, world, list(cfg.objectives),
                                            directions, held_out, cfg.max_new_tokens, cfg.seed,
                                            cfg.verbosity_by_length, cfg.helpfulness_length_bias,
                                            cfg.eval_samples)
            tracking.log_metrics({f"{label}.length.d{i}": row["length"] for i, row in enumerate(sweeps[label])})
        return {"sweep": sweeps}

    def summary(self, run: Run, result, evaluation: dict) -> dict:
        cfg = run.cfg
        lengths = [row["length"] for row in evaluation["sweep"]["policy"]]
        selection = {}  # per iteration: what its kept data teaches (RSFSpec selection_metrics)
        for row in result.metrics:
            if "rsf/iteration" in row:
                selection.setdefault(str(int(row["rsf/iteration"])), {
                    k[len("rsf/"):]: round(v, 3) for k, v in row.items() if k.startswith("rsf/kept_")})
        return {"objectives": list(cfg.objectives),
                "iterations": math.ceil(result.final_step / cfg.steps_per_iteration),
                "selection": selection, **evaluation,
                "length_monotone_decreasing": all(a > b for a, b in zip(lengths, lengths[1:]))}

    def report(self, result: JobResult) -> None:
        s = result.summary
        first, second = s["objectives"]
        for iteration, kept in s["selection"].items():
            print(f"[rsf] iteration {iteration} kept data: " + " ".join(f"{k}={v}" for k, v in kept.items()))
        print(f"[rsf] {s['steps']} steps in {s['iterations']} iteration(s); direction sweep on held-out prompts:")
        for label, rows in s["sweep"].items():
            print(f"[rsf] {label:6s} " + "  ".join(
                f"v=({r['direction'][0]:.2f},{r['direction'][1]:.2f}): len {r['length']:.1f} "
                f"{first} {r[first]:.2f} {second} {r[second]:.2f}" for r in rows))
        print(f"[rsf] policy length decreases monotonically over the sweep: {s['length_monotone_decreasing']}")
        _report_paths("rsf", result)


def train_rsf(cfg: RSFJobConfig) -> JobResult:
    return run_experiment(RSFExperiment(), cfg)
