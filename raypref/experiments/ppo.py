"""PPO of one policy against a P-Soups preference's world judge (``jobs/ppo.py``):

1. the SFT base (cached by config hash) or a given base policy;
2. PPO through the Ray Train + DeepSpeed runner (actor + critic trainable, reference + reward
   frozen), checkpoints and resume by run name;
3. the judged reward of the base and of the trained policy on held-out prompts (same sampling);
4. summary.json + MLflow metrics (per step: reward, KL, losses) and the summary artifact.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from raypref.config import check_fields
from raypref.data.users import psoups_profile
from raypref.data.world import World
from raypref.experiments.run import Experiment, JobResult, PolicyRunConfig, Run, report_paths, run_experiment
from raypref.experiments.world import check_length_reach, job_world
from raypref.models.factory import generate, load_pretrained
from raypref.recipes.ppo import PPOConfig, preference_policy
from raypref.rewards.world import WeightedJudgeReward
from raypref.train.runner import Resources


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
        report_paths("ppo", result)



def train_ppo(cfg: PPOJobConfig) -> JobResult:
    return run_experiment(PPOExperiment(), cfg)


@dataclass(frozen=True)
class _Prompt:
    """A prompt in the shape the per-preference builder reads prompts from (records' .prompt)."""

    prompt: str

