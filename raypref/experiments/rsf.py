"""DPA's rejection-sampling fine-tuning job (``jobs/rsf.py``): RSF iterations on directions v
written in the system prompt (recipes/rsf.py), then the direction sweep of the base and the policy
on held-out prompts (length with its sampling sd, and judged objectives per direction).

Two settings (``judges``): "world", the simulated world's prompts and judges on the tiny model
(v spelled before the prompt, digits added to its vocabulary); "text", real English prompts
(data/prompts.py) judged by rewards/text.py on a chat-template base such as
smollm2-135m-instruct (v as DPA writes it, in the system message; nothing added).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from raypref import tracking
from raypref.config import check_fields
from raypref.data.world import World
from raypref.experiments.run import Experiment, JobResult, PolicyRunConfig, Run, run_experiment
from raypref.experiments.run import report_paths as _report_paths
from raypref.experiments.world import check_length_reach, job_world
from raypref.models.chat import has_chat_template
from raypref.models.factory import generate, load_pretrained
from raypref.recipes.rsf import CANDIDATES
from raypref.train.runner import Optimization, Resources


def _rsf_training() -> Optimization:
    return Optimization(steps=90, micro_batch_size=8, lr=5e-4, warmup_steps=5)


def _rsf_resources() -> Resources:
    return Resources(num_workers=1, cpus_per_worker=1.0, zero_stage=0, checkpoint_every=30)


@dataclass
class RSFJobConfig(PolicyRunConfig):
    """DPA: rejection-sampling fine-tuning on directions v over two objectives judged by
    the simulated world or the text judges, with v written in the system prompt; then the
    direction sweep."""

    # "world": the simulated world's prompts and judges (tiny model); "text": real English prompts
    # judged by rewards/text.py (needs a base with a chat template, e.g. smollm2-135m-instruct)
    judges: str = "world"
    # DPA's helpfulness (the mean of the four UltraFeedback aspects, graded) and verbosity; the
    # world's single helpfulness rating moves in coarse steps, see recipes.rsf.DERIVED_OBJECTIVES
    objectives: list[str] = field(default_factory=lambda: ["overall_helpfulness", "verbosity"])
    n_samples: int = 8  # responses per (prompt, direction); the best by v·r is kept (DPA: 16)
    directions_per_prompt: int = 4  # DPA: 5
    # the sampled directions' angles arctan(v2/v1) in radians: DPA's (−π/4, 0) asks for less of the
    # second objective; (0, ~π/2) spans the first quadrant, more of both (jobs/fronts.py)
    angle_range: list[float] = field(default_factory=lambda: [-math.pi / 4, 0.0])
    prompts_per_iteration: int = 24
    steps_per_iteration: int = 30  # optimizer steps per iteration; training.steps / this = iterations
    replay_fraction: float = 0.15  # of each iteration's data: original (prompt, response) pairs
    max_new_tokens: int = 128  # the verbosity judge needs ~100 words to read 1 (check_length_reach)
    # judges "world" (this and the next; "text" reads verbosity_words): verbosity as words / (words
    # where the judge reads 1): the judge itself reads 0 below ~62 words, where the policy's answers
    # fall, and gives v·r no length to trade (WorldObjectives)
    verbosity_by_length: bool = True
    # DPA's helpfulness reward grows with length (its premise for sampling only v2 <= 0); the
    # world's judge does not, and without it every direction rewards shorter answers and the
    # iterations shrink all of them alike. See rewards.world.WorldObjectives
    helpfulness_length_bias: float = 0.3
    # iteration 1 samples from the bare prompt: a small SFT base cannot follow the unseen direction
    # text (RSFSpec); false for a base that already follows system prompts, as DPA's does
    bare_first_iteration: bool = True
    # "own" (DPA): a (prompt, direction) keeps the best of its own n_samples; "prompt" (a variant):
    # the best of all the prompt's responses under any of its directions (recipes/rsf.py)
    candidates: str = "own"
    # judges "text": the prompts file ("" = the project's questions, data/prompts.py): train split
    # for the iterations, test split for the sweep
    prompts_file: str = ""
    # judges "text": verbosity reads words / this (1 at this many words), on the footing of quality's [0, 1]
    verbosity_words: float = 100.0
    max_length: int = 224
    n_prompts: int = 256  # training prompts (two halves, alternating by iteration)
    # original pairs to replay from: the world's SFT corpus; judges "text": the base's own answers to
    # bare training prompts, as many as one iteration replays (this field is then not read)
    n_original: int = 1000
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
        self.validate_run("RSFJobConfig")
        self.training.validate("RSFJobConfig.training")
        self.resources.validate("RSFJobConfig.resources")
        judged = sorted(judged_objectives(self.judges)) if self.judges in JUDGES else []
        checks = [("judges", self.judges in JUDGES, f"must be one of {JUDGES}"),
                  ("objectives", len(self.objectives) == 2 and set(self.objectives) <= set(judged),
                   f"must be two objectives the {self.judges!r} judges score: {judged}"),
                  ("verbosity_words", self.verbosity_words > 0, "must be > 0"),
                  ("base_policy", self.judges != "text" or bool(self.base_policy),
                   "judges 'text' needs a base with a chat template, e.g. smollm2-135m-instruct "
                   "(the SFT warm start is the simulated world's tiny model)"),
                  ("n_samples", self.n_samples >= 2, "must be >= 2"),
                  ("directions_per_prompt", self.directions_per_prompt >= 1, "must be >= 1"),
                  ("candidates", self.candidates in CANDIDATES, f"must be one of {CANDIDATES}"),
                  ("angle_range", len(self.angle_range) == 2
                   and -math.pi / 2 < self.angle_range[0] <= self.angle_range[1] < math.pi / 2,
                   "must be [low, high] with −π/2 < low <= high < π/2"),
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


JUDGES = ("world", "text")


def judged_objectives(judges: str) -> tuple[str, ...]:
    """The objectives a setting's judges score."""
    if judges == "text":
        from raypref.rewards.text import TextObjectives

        return TextObjectives.KNOWN
    from raypref.rewards.world import objective_ranges

    return tuple(objective_ranges())


def sweep_directions(model, tokenizer, objectives: list[str], directions, prompts: list[str],
                     max_new_tokens: int, seed: int, samples: int, score, system_text=None) -> list[dict]:
    """Per direction v: ``samples`` sampled responses to each of ``prompts`` asked for v
    (`recipes.rsf.direction_query`; the same sampling seeds for every direction), their mean length
    in words, its sampling sd (the sd of that mean from sampling alone, prompts held fixed:
    sqrt(Σ_p var_p / samples) / P over each prompt's sample variance), and ``score(v, prompts,
    responses)``'s entries. ``system_text(v)``: another system message for v (a chat model's;
    default DPA's)."""
    from raypref.recipes.rsf import direction_query

    if system_text and not has_chat_template(tokenizer):
        raise ValueError("sweep_directions: system_text needs a tokenizer with a chat template (a system message)")
    rows, start = [], time.time()
    for i, v in enumerate(directions):
        v = [round(float(x), 4) for x in v]
        queries = ([(p, system_text(v)) for p in prompts] if system_text
                   else [direction_query(tokenizer, v, objectives, p) for p in prompts])
        systems = [s for _, s in queries] if has_chat_template(tokenizer) else None
        responses = [r for k in range(samples)
                     for r in generate(model, tokenizer, [q for q, _ in queries], max_new_tokens, greedy=False,
                                       seed=seed + 7919 * k, system=systems)]
        lengths = torch.tensor([len(r.split()) for r in responses], dtype=torch.float64).view(samples, len(prompts))
        sd = (float(lengths.var(dim=0).sum() / samples) ** 0.5 / len(prompts)) if samples > 1 else float("nan")
        rows.append({"direction": v, "length": float(lengths.mean()), "length_sd": sd,
                     **score(v, list(prompts) * samples, responses)})
        elapsed = time.time() - start  # a real model's sweep takes many minutes: say where it is
        print(f"[rsf]     direction {i + 1}/{len(directions)} {v}: {rows[-1]['length']:.1f} words "
              f"(sd {sd:.2f}) | {elapsed:.0f} s, ETA {elapsed / (i + 1) * (len(directions) - i - 1):.0f} s",
              flush=True)
    return rows


def direction_sweep(model, tokenizer, world: World, objectives: list[str], directions, prompts: list[str],
                    max_new_tokens: int, seed: int, verbosity_by_length: bool = False,
                    helpfulness_length_bias: float = 0.0, samples: int = 1) -> list[dict]:
    """`sweep_directions` judged by the simulated world: per direction the mean of each judged
    objective and of v·r as the job's reward reads it."""
    from raypref.rewards.world import WorldObjectives, judge_objectives

    judge = WorldObjectives(objectives, world.seed, verbosity_by_length, helpfulness_length_bias)

    def score(v, prompts_, responses):
        raw = [judge_objectives(world, r, p) for p, r in zip(prompts_, responses)]
        return {**{o: sum(s[o] for s in raw) / len(raw) for o in objectives},
                "v_dot_r": float((judge.score_objectives(prompts_, responses) @ torch.tensor(v)).mean())}

    return sweep_directions(model, tokenizer, objectives, directions, prompts, max_new_tokens, seed, samples, score)


def text_direction_sweep(model, tokenizer, reward, directions, prompts: list[str], max_new_tokens: int,
                         seed: int, samples: int = 1, system_text=None) -> list[dict]:
    """`sweep_directions` judged by the text judges (``reward``: a `rewards.text.TextObjectives`):
    per direction the mean of every judge's raw score (quality's parts included) and of v·r."""
    def score(v, prompts_, responses):
        raw = reward.raw(prompts_, responses)
        return {**{name: float(values.mean()) for name, values in raw.items()},
                "v_dot_r": float((reward.scaled(raw) @ torch.tensor(v)).mean())}

    return sweep_directions(model, tokenizer, reward.objectives, directions, prompts, max_new_tokens, seed,
                            samples, score, system_text)


def text_prompts(cfg: RSFJobConfig, split: str, n: int) -> list[str]:
    """The first ``n`` prompts of ``split`` in the job's prompts file; fewer is refused."""
    from raypref.data.prompts import load_prompts

    prompts = load_prompts(cfg.prompts_file or None, split=split)
    if len(prompts) < n:
        raise ValueError(f"RSFJobConfig: the prompts file {cfg.prompts_file or 'data/prompts.py default'} has "
                         f"{len(prompts)} {split} prompts, fewer than the {n} asked for")
    return prompts[:n]


def rsf_reward_factory(cfg: RSFJobConfig, base_dir: str = ""):
    """What builds the job's frozen multi-objective reward (on each worker): the world's judges
    over ``cfg.objectives`` with the job's verbosity reading and helpfulness length bias, or the
    text judges with fluency under the frozen base ``base_dir``."""
    from raypref.rewards.world import WorldObjectives

    if cfg.judges == "text":
        from raypref.rewards.text import TextObjectives

        return functools.partial(TextObjectives, list(cfg.objectives), cfg.verbosity_words, lm=base_dir)

    return functools.partial(WorldObjectives, list(cfg.objectives), cfg.sft.world_seed,
                             verbosity_by_length=cfg.verbosity_by_length,
                             helpfulness_length_bias=cfg.helpfulness_length_bias)


class RSFExperiment(Experiment):
    job = "rsf"

    def prepare(self, run: Run) -> None:
        cfg = run.cfg
        if cfg.judges == "text":
            run.data["train_prompts"] = text_prompts(cfg, "train", cfg.n_prompts)
            run.data["held_out"] = text_prompts(cfg, "test", cfg.eval_prompts)
            return
        run.data["world"] = world = job_world(cfg)
        run.data["held_out"] = world.prompts(cfg.eval_prompts, split="test")
        check_length_reach(world, cfg.objectives, cfg.max_new_tokens, "RSFJobConfig")

    def spec(self, run: Run):
        from raypref.recipes.rsf import RSFSpec, spelled_direction

        cfg = run.cfg
        model, tokenizer = load_pretrained(run.base_dir)
        if cfg.judges == "text":
            prompts, original, base_dir = self._text_data(run, model, tokenizer)
            direction_text = None  # the chat template's system message holds DPA's own text
        else:
            prompts, original, base_dir = self._world_data(run, model, tokenizer)
            direction_text = functools.partial(spelled_direction, objectives=list(cfg.objectives))
        run.data["extended_base"] = base_dir
        return RSFSpec(str(base_dir), prompts, original, rsf_reward_factory(cfg, str(base_dir)),
                       objectives=list(cfg.objectives), direction_text=direction_text,
                       n_samples=cfg.n_samples, directions_per_prompt=cfg.directions_per_prompt,
                       angle_range=tuple(cfg.angle_range),
                       prompts_per_iteration=cfg.prompts_per_iteration,
                       steps_per_iteration=cfg.steps_per_iteration, replay_fraction=cfg.replay_fraction,
                       max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length,
                       bare_first_iteration=cfg.bare_first_iteration, candidates=cfg.candidates)

    def _world_data(self, run: Run, model, tokenizer):
        """The world's prompts and SFT corpus; the tiny tokenizer gets the words and digits of the
        spelled direction prompt (added once: a resumed run reuses the saved base)."""
        import numpy as np

        from raypref.models.factory import extend_vocabulary, save_pretrained_safetensors
        from raypref.recipes.rsf import spelled_direction

        cfg, world = run.cfg, run.data["world"]
        words = {w for v in ([1.0, -0.5], [0.25, 0.75]) for w in spelled_direction(v, cfg.objectives).split()}
        added = extend_vocabulary(model, tokenizer, sorted(words | set("0123456789")), seed=cfg.seed)
        base_dir = run.out / "base" if added else Path(run.base_dir)
        if added and not (base_dir / "config.json").exists():
            save_pretrained_safetensors(model, tokenizer, base_dir)
        print(f"[rsf] base {run.base_dir}; {len(added)} tokens added for the direction prompt", flush=True)
        rng = np.random.default_rng([cfg.seed, 3])
        return world.prompts(cfg.n_prompts), world.sft_corpus(cfg.n_original, rng), base_dir

    def _text_data(self, run: Run, model, tokenizer):
        """The training prompts, and as original data the base's own sampled answers to the first of
        them without a direction (as many as one iteration replays): there is no SFT corpus of real
        text, and DPA replays its base's data so the policy keeps answering as it did."""
        cfg, prompts = run.cfg, run.data["train_prompts"]
        if not has_chat_template(tokenizer):
            raise ValueError(f"RSFJobConfig.judges='text': the base {run.base_dir!r} has no chat template to "
                             "put the direction in a system message; use an instruct model such as "
                             "base_policy=smollm2-135m-instruct")
        kept = cfg.prompts_per_iteration * cfg.directions_per_prompt
        n_replay = round(kept * cfg.replay_fraction / (1.0 - cfg.replay_fraction))
        asked = [prompts[i % len(prompts)] for i in range(n_replay)]
        original = list(zip(asked, generate(model.eval(), tokenizer, asked, cfg.max_new_tokens, greedy=False,
                                            seed=cfg.seed)))
        print(f"[rsf] base {run.base_dir} (chat template: v in the system message); {len(prompts)} prompts, "
              f"{len(original)} base answers to replay", flush=True)
        return prompts, original, run.base_dir

    def runner_config(self, run: Run):
        return replace(super().runner_config(run), log_every=max(1, run.cfg.steps_per_iteration // 2))

    def evaluate(self, run: Run, result) -> dict:
        """The direction sweep on held-out prompts, of the base and of the policy."""
        from raypref.algos.dpa import directions_between

        cfg, held_out = run.cfg, run.data["held_out"]
        directions = directions_between((1.0, 0.0), (math.sqrt(0.5), -math.sqrt(0.5)), cfg.eval_directions)
        reward = rsf_reward_factory(cfg, str(run.data["extended_base"]))() if cfg.judges == "text" else None
        sweeps = {}
        for label, folder in (("base", run.data["extended_base"]), ("policy", result.export_path)):
            policy, policy_tokenizer = load_pretrained(folder)
            print(f"[rsf] direction sweep of the {label}: {len(directions)} directions x {len(held_out)} "
                  f"prompts x {cfg.eval_samples} samples", flush=True)
            if reward is not None:
                sweeps[label] = text_direction_sweep(policy.eval(), policy_tokenizer, reward, directions, held_out,
                                                     cfg.max_new_tokens, cfg.seed, cfg.eval_samples)
            else:
                sweeps[label] = direction_sweep(policy.eval(), policy_tokenizer, run.data["world"],
                                                list(cfg.objectives), directions, held_out, cfg.max_new_tokens,
                                                cfg.seed, cfg.verbosity_by_length, cfg.helpfulness_length_bias,
                                                cfg.eval_samples)
            tracking.log_metrics({f"{label}.length.d{i}": row["length"] for i, row in enumerate(sweeps[label])})
        return {"sweep": sweeps}

    def summary(self, run: Run, result, evaluation: dict) -> dict:
        cfg = run.cfg
        selection = {}  # per iteration: what its kept data teaches (RSFSpec selection_metrics)
        for row in result.metrics:
            if "rsf/iteration" in row:
                selection.setdefault(str(int(row["rsf/iteration"])), {
                    k[len("rsf/"):]: round(v, 3) for k, v in row.items() if k.startswith("rsf/kept_")})
        return {"objectives": list(cfg.objectives), "judges": cfg.judges,
                "iterations": math.ceil(result.final_step / cfg.steps_per_iteration),
                "selection": selection, **evaluation,
                **{f"{label}_{k}": v for label, rows in evaluation["sweep"].items()
                   for k, v in length_figures(rows, cfg.objectives[0]).items()},
                "length_monotone_decreasing": length_figures(evaluation["sweep"]["policy"], cfg.objectives[0])[
                    "length_monotone_decreasing"]}

    def report(self, result: JobResult) -> None:
        s = result.summary
        first, second = s["objectives"]
        for iteration, kept in s["selection"].items():
            print(f"[rsf] iteration {iteration} kept data: " + " ".join(f"{k}={v}" for k, v in kept.items()))
        print(f"[rsf] {s['steps']} steps in {s['iterations']} iteration(s); direction sweep on held-out prompts "
              "(length: mean words ± its sampling sd):")
        for label, rows in s["sweep"].items():
            print(f"[rsf] {label:6s} " + "  ".join(
                f"v=({r['direction'][0]:.2f},{r['direction'][1]:.2f}): len {r['length']:.1f}±{r['length_sd']:.1f} "
                f"{first} {r[first]:.3f} {second} {r[second]:.3f}" for r in rows))
            print(f"[rsf] {label:6s} length decreases monotonically: {s[f'{label}_length_monotone_decreasing']}; "
                  f"first-last {s[f'{label}_length_drop']:.1f} words = {s[f'{label}_length_drop_sds']:.1f} sampling "
                  f"sds; {first} from {s[f'{label}_{first}_min']:.3f} to {s[f'{label}_{first}_max']:.3f}")
        _report_paths("rsf", result)


def length_figures(rows: list[dict], helpfulness: str) -> dict:
    """DPA's length-vs-direction figures of one sweep: is the mean length monotone decreasing, the
    first-last drop in words and in sampling sds (of the difference of the two means), and the
    range of the helpfulness objective over the directions."""
    lengths = [r["length"] for r in rows]
    drop = lengths[0] - lengths[-1]
    sd = math.hypot(rows[0]["length_sd"], rows[-1]["length_sd"])
    values = [r[helpfulness] for r in rows]
    return {"length_monotone_decreasing": all(a > b for a, b in zip(lengths, lengths[1:])),
            "length_drop": drop, "length_drop_sds": drop / sd if sd > 0 else float("nan"),
            f"{helpfulness}_min": min(values), f"{helpfulness}_max": max(values)}


def train_rsf(cfg: RSFJobConfig) -> JobResult:
    return run_experiment(RSFExperiment(), cfg)
