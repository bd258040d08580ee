"""DPA's rejection-sampling fine-tuning job (``jobs/rsf.py``) on the simulated world: RSF iterations
on directions v written in the system prompt (recipes/rsf.py), then the direction sweep of the base
and the policy on held-out prompts (length and judged objectives per direction).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from raypref import tracking
from raypref.config import check_fields
from raypref.data.world import World
from raypref.experiments.policy import _report_paths, check_length_reach, job_world
from raypref.experiments.run import Experiment, JobResult, PolicyRunConfig, Run, run_experiment
from raypref.models.factory import generate, load_pretrained
from raypref.train.runner import Optimization, Resources


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
