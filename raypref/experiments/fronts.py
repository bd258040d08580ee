"""The fronts of three methods side by side (``jobs/fronts.py``) on two objectives, each to be raised:
the same prompts, judges and budget for every method.

- **P-Soups**: one LoRA DPO policy per objective (the preference that raises it, P-Soups Table 4),
  merged exactly, base + w·Δ₁ + (1−w)·Δ₂ (models/merge.py), for w over ``n_weights`` values;
- **DPA**: RSF on directions v over the two objectives (experiments/rsf.py's experiment builds the
  spec; the directions span the first quadrant), asked for v ∝ (w, 1−w);
- **P-MORL**: one LoRA DPO policy on pairs labelled by w·r₁ + (1−w)·r₂ with the weights written in
  its instruction (DPA's wording, `algos.dpa.direction_system_prompt`), asked for (w, 1−w);
- **Prompting**: the base with the same instruction, untrained.

Each method's points (mean judged scores on held-out prompts) form its front; the hypervolume of
each front (`hypervolume_2d`) w.r.t. one reference point carries a bootstrap interval over prompts
(`front_intervals`). Writes ``fronts.png``, ``points.csv``, ``points.md`` and ``summary.json`` in the
run folder and logs them to MLflow.

Budgets (see `budget`): P-Soups labels the N candidate pairs once per objective (2N labels, two
policies of S steps); P-MORL labels the same N candidates twice, each time under its own drawn
weights (2N labels, one policy of 2S steps); DPA judges 4N sampled responses (the responses 2N pairs
hold) and takes 2S steps; every step sees ``training.micro_batch_size`` examples.

Settings (``judges``): "world", the simulated world on the tiny SFT model (the P-Soups pairs'
latent labels, judged by `rewards.world.WorldObjectives`); "text", real questions answered by a
chat-template base such as smollm2-135m-instruct, candidate pairs drawn from the shared candidate
pool (`recipes.pool`: the base's answers under P-Soups system prompts, the soups job's pool) and
labelled from the pool's text-judge scores on `rewards.text.TextObjectives`' footing.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raypref import atomic, tracking
from raypref.config import check_fields, config_hash, to_dict
from raypref.experiments.run import SUMMARY_FILE, JobResult, PolicyRunConfig
from raypref.recipes.dpo import DPOConfig
from raypref.recipes.pool import PoolConfig
from raypref.train.runner import Resources

METHODS = ("psoups", "dpa", "pmorl", "prompting")
LABELS = {"psoups": "P-Soups", "dpa": "DPA", "pmorl": "P-MORL", "prompting": "Prompting"}
JUDGES = ("world", "text")
# the world attribute each text judge measures (the P-Soups dimension it stands for)
TEXT_TO_WORLD = {"verbosity": "verbosity", "friendliness": "style", "expertise": "expertise"}
DEFAULT_OBJECTIVES = {"world": ["verbosity", "style"], "text": ["verbosity", "friendliness"]}
# DPA's directions over the first quadrant: angles in [0, π/2) (algos.dpa.sample_directions
# excludes π/2 itself, where v1 = 0)
FIRST_QUADRANT = [0.0, math.pi / 2 - 1e-3]


def _fronts_training() -> DPOConfig:
    # the soups job's per-preference DPO settings (NLL term included), at half its steps
    return DPOConfig(steps=100, micro_batch_size=8, lr=5e-4, beta=0.5, warmup_steps=10, sft_weight=1.0)


def _fronts_resources() -> Resources:
    return Resources(num_workers=1, cpus_per_worker=1.0, zero_stage=0, checkpoint_every=50)


@dataclass
class FrontsConfig(PolicyRunConfig):
    """The fronts of P-Soups, DPA, P-MORL and Prompting on two objectives, same prompts, judges and budget."""

    output_dir: str = "outputs/fronts"
    run_name: str = "fronts"  # an existing name reuses its finished training runs
    judges: str = "world"  # "world": the simulated world (tiny model); "text": real questions, text judges
    # two objectives, both raised; [] = world: verbosity × style, text: verbosity × friendliness
    objectives: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    n_weights: int = 5  # w evenly over [0, 1]: every method's front has this many points
    # N: candidate pairs, each labelled by each objective for P-Soups (see the module doc for budgets)
    pairs_per_policy: int = 800
    # each P-Soups policy's DPO (S = steps); P-MORL takes 2S steps with the same settings
    training: DPOConfig = field(default_factory=_fronts_training)
    resources: Resources = field(default_factory=_fronts_resources)
    dpa_lr: float = 5e-4  # RSF's SFT-loss learning rate (the RSF job's default); steps: 2S
    dpa_iterations: int = 4  # RSF iterations in its 2S steps
    dpa_samples: int = 8  # sampled responses per (prompt, direction); the best by v·r is kept
    dpa_directions_per_prompt: int = 4
    # RSF's first iteration samples from the bare prompt (a small SFT base cannot yet read the
    # direction); false for an instruct base that follows a system prompt (recipes/rsf.py)
    dpa_bare_first_iteration: bool = True
    # DPA's checkpoints, in steps (0 = resources.checkpoint_every): RSF trains the whole model, and a
    # full SmolLM2 checkpoint with its optimizer state is ~1.6 GB where a LoRA's is a few MB
    dpa_checkpoint_every: int = 0
    max_new_tokens: int = 128  # for training samples (DPA, the text pool) and evaluation alike
    eval_prompts: int = 48  # held-out prompts (the world has 96 test prompts)
    eval_samples: int = 2  # sampled responses per held-out prompt and point (same seeds for every point)
    # the hypervolume's reference point in the judged units; [] = per objective the lowest mean of
    # every point of every method and the base's, recomputed in each bootstrap replicate
    reference: list[float] = field(default_factory=list)
    n_boot: int = 2000  # bootstrap replicates over held-out prompts
    level: float = 0.95  # of the percentile intervals
    # judges "text": the prompts file ("" = the project's questions): train split for pairs and
    # DPA, test split for evaluation; verbosity is read as words / verbosity_words
    prompts_file: str = ""
    # judges "text": the shared candidate pool the P-Soups and P-MORL pairs come from (generated and
    # judged once if missing); its prompts must be prompts_file, so every method learns from the
    # same questions
    pool: PoolConfig = field(default_factory=PoolConfig)
    verbosity_words: float = 100.0
    max_length: int = 224  # tokens per DPA training example (prompt + response)
    max_concurrent_runs: int = 0  # training runs at once; 0 = as many as the cluster holds

    def resolved_objectives(self) -> list[str]:
        return list(self.objectives) or list(DEFAULT_OBJECTIVES.get(self.judges, []))

    def validate(self) -> None:
        where = "FrontsConfig"
        self.validate_run(where)
        self.training.validate(f"{where}.training")
        self.resources.validate(f"{where}.resources")
        objectives = self.resolved_objectives()
        known = judged_objectives(self.judges) if self.judges in JUDGES else ()
        unknown_methods = sorted(set(self.methods) - set(METHODS))
        checks = [("judges", self.judges in JUDGES, f"must be one of {JUDGES}"),
                  ("objectives", len(objectives) == 2 and len(set(objectives)) == 2 and set(objectives) <= set(known),
                   f"must be two distinct objectives the {self.judges!r} judges can raise: {list(known)}"),
                  ("methods", bool(self.methods) and not unknown_methods and len(set(self.methods)) == len(self.methods),
                   f"must be distinct names among {list(METHODS)}"),
                  ("base_policy", self.judges != "text" or bool(self.base_policy),
                   "judges 'text' needs a base with a chat template, e.g. smollm2-135m-instruct"),
                  ("n_weights", self.n_weights >= 5, "must be >= 5 (a front of at least 5 points)"),
                  ("pairs_per_policy", self.pairs_per_policy >= self.training.micro_batch_size * self.resources.num_workers,
                   "must hold at least one step's pairs (training.micro_batch_size x resources.num_workers)"),
                  ("dpa_lr", self.dpa_lr > 0, "must be > 0"),
                  ("dpa_iterations", 1 <= self.dpa_iterations <= 2 * self.training.steps,
                   "must be between 1 and 2 x training.steps"),
                  ("dpa_samples", self.dpa_samples >= 2, "must be >= 2"),
                  ("dpa_directions_per_prompt", self.dpa_directions_per_prompt >= 1, "must be >= 1"),
                  ("dpa_checkpoint_every", self.dpa_checkpoint_every >= 0, "must be >= 0 (0 = resources.checkpoint_every)"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
                  ("eval_prompts", self.eval_prompts >= 2, "must be >= 2 (the bootstrap resamples prompts)"),
                  ("eval_samples", self.eval_samples >= 1, "must be >= 1"),
                  ("reference", self.reference == [] or (len(self.reference) == 2
                                                         and all(math.isfinite(x) for x in self.reference)),
                   "must be [] (the lowest point) or two finite numbers"),
                  ("n_boot", self.n_boot >= 100, "must be >= 100"),
                  ("level", 0.0 < self.level < 1.0, "must be in (0, 1)"),
                  ("verbosity_words", self.verbosity_words > 0, "must be > 0"),
                  ("max_concurrent_runs", self.max_concurrent_runs >= 0, "must be >= 0 (0 = as many as fit)")]
        check_fields(where, self, checks)
        if self.judges == "text":
            self.pool.validate()
            if self.pool.prompts != self.prompts_file:
                raise ValueError(f"{where}.pool.prompts={self.pool.prompts!r}: must be prompts_file="
                                 f"{self.prompts_file!r}, so every method learns from the same questions")
        if "dpa" in self.methods and dpa_prompts_per_iteration(self) < 1:
            raise ValueError(f"{where}.pairs_per_policy={self.pairs_per_policy}: DPA's share (4 x pairs_per_policy "
                             f"judged responses) is less than one iteration's prompt: dpa_iterations x "
                             f"dpa_directions_per_prompt x dpa_samples = "
                             f"{self.dpa_iterations * self.dpa_directions_per_prompt * self.dpa_samples}")


def judged_objectives(judges: str) -> tuple[str, ...]:
    """The objectives a setting's judges score and a P-Soups preference raises."""
    return tuple(TEXT_TO_WORLD) if judges == "text" else tuple(TEXT_TO_WORLD.values())


def raising_preference(judges: str, objective: str) -> str:
    """The P-Soups preference (Table 4) that asks for more of ``objective``: P2B verbose, P3A
    friendly, P1B expert."""
    from raypref.data.users import psoups_profiles

    attribute = TEXT_TO_WORLD[objective] if judges == "text" else objective
    return next(p.name for p in psoups_profiles() if p.attribute == attribute and p.direction > 0)


def weight_grid(n: int) -> list[float]:
    """w evenly over [0, 1], rounded to 2 decimals (what an instruction can state)."""
    return [round(i / (n - 1), 2) for i in range(n)]


def dpa_prompts_per_iteration(cfg: FrontsConfig) -> int:
    """Prompts per RSF iteration so that DPA judges 4N responses in all (the 2N pairs' responses)."""
    per_prompt = cfg.dpa_iterations * cfg.dpa_directions_per_prompt * cfg.dpa_samples
    return (4 * cfg.pairs_per_policy) // per_prompt


def budget(cfg: FrontsConfig) -> dict[str, dict]:
    """What each method learns from: judge labels / judged responses, optimizer steps, examples per step."""
    n, s, mb = cfg.pairs_per_policy, cfg.training.steps, cfg.training.micro_batch_size
    ppi = dpa_prompts_per_iteration(cfg)
    dpa_judged = ppi * cfg.dpa_iterations * cfg.dpa_directions_per_prompt * cfg.dpa_samples
    return {"psoups": {"policies": 2, "labelled_pairs": 2 * n, "judged_responses": 4 * n, "steps": 2 * s,
                       "examples_per_step": mb, "data": "the N candidate pairs, labelled once per objective"},
            "pmorl": {"policies": 1, "labelled_pairs": 2 * n, "judged_responses": 4 * n, "steps": 2 * s,
                      "examples_per_step": mb, "data": "the N candidate pairs, each labelled under 2 drawn weights"},
            "dpa": {"policies": 1, "labelled_pairs": 0, "judged_responses": dpa_judged, "steps": 2 * s,
                    "examples_per_step": mb, "data": f"{cfg.dpa_iterations} RSF iterations x {ppi} prompts x "
                    f"{cfg.dpa_directions_per_prompt} directions x {cfg.dpa_samples} samples, best by v·r kept"},
            "prompting": {"policies": 0, "labelled_pairs": 0, "judged_responses": 0, "steps": 0,
                          "examples_per_step": 0, "data": "none: the base, instructed"}}


# ---------------------------------------------------------------- hypervolume and its interval

def hypervolume_2d(points, reference) -> float:
    """The area dominated by ``points`` (both coordinates raised) and bounded below by ``reference``:
    the area of the union of the boxes [ref_x, x] × [ref_y, y]. Points not above the reference in
    both coordinates add nothing; dominated points add nothing."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    rx, ry = (float(v) for v in reference)
    pts = pts[(pts[:, 0] > rx) & (pts[:, 1] > ry)]
    area, top = 0.0, ry
    for x, y in pts[np.lexsort((-pts[:, 1], -pts[:, 0]))]:  # by x falling (y falling on ties)
        if y > top:
            area += (x - rx) * (y - top)
            top = y
    return area


def _reference(means: dict[str, np.ndarray], base: np.ndarray | None, fixed) -> np.ndarray:
    if fixed:
        return np.asarray(fixed, dtype=np.float64)
    rows = [m for m in means.values()] + ([base[None]] if base is not None else [])
    return np.concatenate(rows).min(axis=0)


def front_intervals(scores: dict[str, np.ndarray], base: np.ndarray | None = None, reference=(),
                    n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Hypervolume of each method's front with a percentile bootstrap interval over prompts.

    ``scores[method]``: [points, prompts, 2] per-prompt mean scores of each point; ``base``:
    [prompts, 2] of the base (counted in the lowest-point reference only). A replicate resamples the
    prompts with replacement (the same prompts for every method and point), recomputes every point's
    mean, the reference (``reference`` = () : the lowest mean per objective over all points) and each
    hypervolume. Also the interval of each method's hypervolume minus the first method's."""
    if not scores:
        raise ValueError("front_intervals: no methods")
    n_prompts = {s.shape[1] for s in scores.values()} | ({base.shape[0]} if base is not None else set())
    if len(n_prompts) != 1 or any(s.ndim != 3 or s.shape[2] != 2 for s in scores.values()):
        raise ValueError("front_intervals: every method needs [points, prompts, 2] scores over the same prompts; "
                         f"got {[s.shape for s in scores.values()]}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"front_intervals: need 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")
    (n,) = n_prompts
    names, first = list(scores), next(iter(scores))

    def volumes(weights: np.ndarray) -> dict[str, float]:
        means = {m: np.einsum("p,kpd->kd", weights, s) / weights.sum() for m, s in scores.items()}
        ref = _reference(means, None if base is None else weights @ base / weights.sum(), reference)
        return {m: hypervolume_2d(means[m], ref) for m in names}

    estimate = volumes(np.ones(n))
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    boot = [volumes(w) for w in draws]
    alpha = (1 - level) / 2
    out = {"level": level, "n_boot": n_boot, "prompts": n, "reference": _reference(
        {m: s.mean(axis=1) for m, s in scores.items()}, None if base is None else base.mean(axis=0),
        reference).tolist(), "hypervolume": {}, f"minus_{first}": {}}
    for m in names:
        values = np.array([b[m] for b in boot])
        low, high = np.quantile(values, [alpha, 1 - alpha])
        out["hypervolume"][m] = {"estimate": estimate[m], "low": float(low), "high": float(high)}
        if m != first:
            diff = values - np.array([b[first] for b in boot])
            low, high = np.quantile(diff, [alpha, 1 - alpha])
            out[f"minus_{first}"][m] = {"estimate": estimate[m] - estimate[first], "low": float(low),
                                        "high": float(high)}
    return out


# ---------------------------------------------------------------- the job

def _log(msg: str) -> None:
    print(f"[fronts {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_fronts(cfg: FrontsConfig) -> JobResult:
    """What ``jobs/fronts.py`` runs (see the module docstring)."""
    from raypref import ray_session
    from raypref.models.factory import check_lora_targets

    cfg.validate()
    objectives = cfg.resolved_objectives()
    cfg = dataclasses.replace(cfg, objectives=objectives)
    if cfg.base_policy:
        check_lora_targets(cfg.base_policy, cfg.training.lora, "FrontsConfig.training.lora")
    out = Path(cfg.output_dir).expanduser().resolve() / cfg.run_name
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tracking.start_run("fronts", cfg, cfg.output_dir, run_name=cfg.run_name) as mlrun:
        _log(f"run {cfg.run_name}: {out}; objectives {objectives}; methods {cfg.methods}")
        if not ray_session_ready():
            ray_session.init(include_dashboard=False, configure_logging=False)
        setting = world_setting(cfg, out) if cfg.judges == "world" else text_setting(cfg, out)
        trained, outcomes = train_methods(cfg, setting, out)
        train_seconds = time.time() - started
        points, scores, base_scores = evaluate_fronts(cfg, setting, trained)
        intervals = front_intervals({m: scores[m] for m in cfg.methods}, base_scores, cfg.reference,
                                    cfg.n_boot, cfg.level, cfg.seed)
        files = write_outputs(cfg, out, points, intervals)
        summary = {"run_name": cfg.run_name, "judges": cfg.judges, "objectives": objectives,
                   "methods": list(cfg.methods), "weights": weight_grid(cfg.n_weights),
                   "budget": {m: budget(cfg)[m] for m in cfg.methods}, "hypervolume": intervals,
                   "points": points, "dominance": dominance(points, cfg.methods, objectives),
                   "base_policy": setting["base_dir"], "train_seconds": round(train_seconds, 1),
                   "total_seconds": round(time.time() - started, 1), "files": {k: str(v) for k, v in files.items()},
                   "mlflow_run_id": mlrun.info.run_id, "tracking_uri": tracking.tracking_uri(cfg.output_dir)}
        atomic.write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
        tracking.log_dict(summary, SUMMARY_FILE)
        for m, iv in intervals["hypervolume"].items():
            tracking.log_metrics({f"hypervolume.{m}": iv["estimate"], f"hypervolume.{m}.low": iv["low"],
                                  f"hypervolume.{m}.high": iv["high"]})
        tracking.log_metrics({"train_seconds": train_seconds, "total_seconds": time.time() - started})
        for path in files.values():
            tracking.log_artifact(path, artifact_path="fronts")
        _log_training_children(outcomes)
    result = JobResult(out, None, summary, mlrun.info.run_id, summary["tracking_uri"])
    report(result)
    return result


def ray_session_ready() -> bool:
    import ray

    return ray.is_initialized()


def report(result: JobResult) -> None:
    s = result.summary
    a, b = s["objectives"]
    hv = s["hypervolume"]
    _log(f"hypervolume w.r.t. ({hv['reference'][0]:.3f}, {hv['reference'][1]:.3f}) with {hv['level']:.0%} "
         f"intervals over {hv['prompts']} prompts:")
    for m, iv in hv["hypervolume"].items():
        _log(f"  {LABELS[m]:9s} {iv['estimate']:.4f} [{iv['low']:.4f}, {iv['high']:.4f}]  points ({a}, {b}): "
             + " ".join(f"({p[a]:.2f},{p[b]:.2f})" for p in s["points"] if p["method"] == m))
    _log(f"plot: {s['files']['plot']}; table: {s['files']['markdown']}")
    _log(f"summary: {result.output_dir / SUMMARY_FILE}; MLflow run {result.run_id} in {result.tracking_uri}")


# ---------------------------------------------------------------- data: one candidate set for every arm

def _instruction(tokenizer, weights, objectives, prompt: str) -> tuple[str, str | None]:
    """(prompt text, system text) asking for ``weights`` in DPA's wording: a chat template's system
    message, or the spelled text before the prompt of the tiny word-level model (recipes.rsf)."""
    from raypref.recipes.rsf import direction_query

    return direction_query(tokenizer, [float(w) for w in weights], objectives, prompt)


def _drawn_weights(n: int, seed: int) -> list[list[float]]:
    """P-MORL's training weights (w, 1 − w), w uniform on the 2-decimal grid its instruction states."""
    w = np.round(np.random.default_rng([seed, 5]).uniform(0.0, 1.0, size=n), 2)
    return [[float(x), round(1.0 - float(x), 2)] for x in w]


def world_setting(cfg: FrontsConfig, out: Path) -> dict:
    """The simulated world: the SFT base with the words and digits of the instructions added (once,
    saved as ``<run>/base-<hash>``: every arm starts from it), the candidate pairs labelled for each arm, the
    held-out prompts and the judge."""
    from raypref.algos.dpa import direction_system_prompt, spelled
    from raypref.data.labelling import candidate_pairs, label_pairs, preference_labeller, weighted_labelled_pairs
    from raypref.experiments.world import check_length_reach, job_world
    from raypref.models.factory import extend_vocabulary, load_pretrained, save_pretrained_safetensors
    from raypref.recipes.sft import train_sft
    from raypref.rewards.world import WorldObjectives

    objectives = cfg.objectives
    world = job_world(cfg)
    check_length_reach(world, objectives, cfg.max_new_tokens, "FrontsConfig")
    # named by what it is made of: a rerun with other objectives or another SFT base gets its own
    key = config_hash({"sft": to_dict(cfg.sft), "base_policy": cfg.base_policy, "objectives": objectives,
                       "seed": cfg.seed})
    base_dir = out / f"base-{key}"
    if not (base_dir / "config.json").exists():
        sft_dir = cfg.base_policy or str(train_sft(cfg.sft))
        model, tokenizer = load_pretrained(sft_dir)
        words = {w for v in ([1.0, -0.5], [0.25, 0.75]) for w in spelled(direction_system_prompt(v, objectives)).split()}
        added = extend_vocabulary(model, tokenizer, sorted(words | set("0123456789")), seed=cfg.seed)
        save_pretrained_safetensors(model, tokenizer, base_dir)
        _log(f"base {sft_dir} + {len(added)} tokens for the instructions -> {base_dir}")
    _, tokenizer = load_pretrained(base_dir)
    prefs = [raising_preference("world", o) for o in objectives]
    n = cfg.pairs_per_policy
    candidates = candidate_pairs(world, n, [cfg.seed, 0])
    psoups = {p: label_pairs(world, candidates, preference_labeller([p]), [cfg.seed, 0],
                             user_text=None, source=f"world:fronts:{p}") for p in prefs}
    weights = _drawn_weights(2 * n, cfg.seed)
    texts = [_instruction(tokenizer, w, objectives, "")[0].strip() for w in weights]
    pmorl = weighted_labelled_pairs(world, candidates + candidates, prefs, weights, [cfg.seed, 0], user_texts=texts,
                                    source="world:fronts:pmorl")
    pmorl = [dataclasses.replace(r, prompt=_instruction(tokenizer, w, objectives, r.prompt)[0])
             for r, w in zip(pmorl, weights)]
    judge = WorldObjectives(objectives, world.seed, verbosity_by_length=True)
    _log(f"{n} candidate pairs: P-Soups {', '.join(prefs)} {n} labels each, P-MORL {2 * n} under drawn weights")
    return {"base_dir": str(base_dir), "preferences": prefs, "psoups": psoups, "pmorl": pmorl, "pmorl_system": "",
            "eval_prompts": world.prompts(cfg.eval_prompts, split="test"),
            "score": lambda prompts, texts: judge.score_objectives(prompts, texts).numpy().astype(np.float64),
            "quality": lambda prompts, texts: np.array([world.quality(t, p) for p, t in zip(prompts, texts)])}


def pool_pair_rows(pool, judge, n: int, seed: int) -> list[dict]:
    """``n`` candidate pairs of the shared pool's train split (`recipes.pool.pair_indices`, the
    soups job's draw): {"prompt", "responses": [a, b], "scores": [a's, b's]}, each score the pool's
    judged value on ``judge``'s footing (`TextObjectives.scaled`, in its objectives' order)."""
    from raypref.recipes.pool import pair_indices

    missing = sorted(set(judge.objectives) - set(pool.scores))
    if missing:
        raise ValueError(f"the pool in {pool.folder} has no scores of {missing}: judge it with "
                         f"`python jobs/pool.py` and judges including {list(judge.objectives)}")
    scaled = judge.scaled({o: pool.scores[o] for o in judge.objectives}).tolist()
    rows = []
    for a, b in pair_indices(pool, n, [seed, 0], "train"):
        rows.append({"prompt": pool.prompts[pool.candidates[a].prompt][0],
                     "responses": [pool.candidates[a].text, pool.candidates[b].text],
                     "scores": [scaled[a], scaled[b]]})
    return rows


def text_setting(cfg: FrontsConfig, out: Path) -> dict:
    """Real questions: N candidate pairs (two answers to one train question) from the shared
    candidate pool (`recipes.pool`, the soups and reward-comparison jobs' pool: generated and
    judged once if missing), labelled from the pool's judged scores for every arm."""
    from raypref.data.prompts import load_prompts
    from raypref.data.records import PreferenceRecord
    from raypref.models.chat import has_chat_template
    from raypref.models.factory import load_tokenizer
    from raypref.recipes.pool import ensure_pool, resolved
    from raypref.rewards.text import TextObjectives

    objectives, n = cfg.objectives, cfg.pairs_per_policy
    base_dir = cfg.base_policy
    tokenizer = load_tokenizer(base_dir)
    if not has_chat_template(tokenizer):
        raise ValueError(f"FrontsConfig.judges='text': the base {base_dir!r} has no chat template for the "
                         "instructions' system message; use e.g. base_policy=smollm2-135m-instruct")
    held_out = load_prompts(cfg.prompts_file or None, split="test")
    if len(held_out) < cfg.eval_prompts:
        raise ValueError(f"FrontsConfig.eval_prompts={cfg.eval_prompts}: the prompts file has only "
                         f"{len(held_out)} test prompts")
    judge = TextObjectives(objectives, cfg.verbosity_words)
    pool = ensure_pool(resolved(cfg.pool), log=print)
    # the pool's answers may come from another model than the base (off-policy pairs): say which
    _log(f"candidate pool {pool.folder}: {len(pool.candidates)} answers of {cfg.pool.model} "
         f"(the base: {base_dir})")
    pool = pool_pair_rows(pool, judge, n, cfg.seed)
    rng = np.random.default_rng([cfg.seed, 0])
    coins = rng.random(2 * n)  # ties decided by a fair coin, the same draw for every arm at a position

    def labelled(values: list[tuple[float, float]], user_texts=None) -> list:
        records = []
        for i, (row, (a, b)) in enumerate(zip(pool * 2, values)):
            first_wins = a > b if a != b else coins[i] < 0.5
            chosen, rejected = row["responses"] if first_wins else row["responses"][::-1]
            records.append(PreferenceRecord(row["prompt"], chosen, rejected,
                                            user_text=user_texts[i] if user_texts else None, source="text:fronts"))
        return records

    prefs = [raising_preference("text", o) for o in objectives]
    psoups = {p: labelled([(r["scores"][0][k], r["scores"][1][k]) for r in pool]) for k, p in enumerate(prefs)}
    weights = _drawn_weights(2 * n, cfg.seed)
    pmorl = labelled([(w[0] * r["scores"][0][0] + w[1] * r["scores"][0][1], w[0] * r["scores"][1][0] + w[1] * r["scores"][1][1])
                      for r, w in zip(pool * 2, weights)],
                     user_texts=[_instruction(tokenizer, w, objectives, "")[1] for w in weights])
    return {"base_dir": str(base_dir), "preferences": prefs, "psoups": psoups, "pmorl": pmorl,
            "pmorl_system": "user_text", "eval_prompts": held_out[:cfg.eval_prompts],
            "score": lambda prompts, texts: judge.score_objectives(prompts, texts).numpy().astype(np.float64),
            "quality": None}


# ---------------------------------------------------------------- training: the soups' and RSF's runs

def dpa_config(cfg: FrontsConfig, base_dir: str, out: Path):
    """The RSF job's config for DPA's arm: its budget (see `budget`) on the fronts' objectives, the
    directions over the first quadrant, verbosity read as length on the world."""
    from raypref.experiments.rsf import RSFJobConfig
    from raypref.train.runner import Optimization

    steps = 2 * cfg.training.steps
    return RSFJobConfig(
        output_dir=str(out), run_name="dpa", seed=cfg.seed, base_policy=base_dir, sft=cfg.sft,
        judges=cfg.judges, objectives=list(cfg.objectives), n_samples=cfg.dpa_samples,
        directions_per_prompt=cfg.dpa_directions_per_prompt, angle_range=list(FIRST_QUADRANT),
        prompts_per_iteration=dpa_prompts_per_iteration(cfg),
        steps_per_iteration=math.ceil(steps / cfg.dpa_iterations), max_new_tokens=cfg.max_new_tokens,
        verbosity_by_length=True, helpfulness_length_bias=0.0, bare_first_iteration=cfg.dpa_bare_first_iteration,
        prompts_file=cfg.prompts_file,
        verbosity_words=cfg.verbosity_words, max_length=cfg.max_length,
        training=Optimization(steps=steps, micro_batch_size=cfg.training.micro_batch_size, lr=cfg.dpa_lr,
                              warmup_steps=cfg.training.warmup_steps),
        resources=dataclasses.replace(cfg.resources, checkpoint_every=cfg.dpa_checkpoint_every
                                      or cfg.resources.checkpoint_every))


def training_jobs(cfg: FrontsConfig, setting: dict, out: Path) -> dict[str, tuple]:
    """{run name: (spec, runner config)}: a DPO policy per objective (P-Soups), P-MORL's DPO policy
    (2S steps), DPA's RSF policy; specs from the registry's DPO entry and the RSF job's experiment."""
    from raypref.experiments.rsf import RSFExperiment
    from raypref.experiments.run import Run
    from raypref.recipes import recipe
    from raypref.train.runner import runner_config

    runs_dir, base_dir = str(out / "runs"), setting["base_dir"]
    build = recipe("dpo").per_preference
    jobs = {}  # the longest first: DPA samples as it trains, the others wait less beside it
    if "dpa" in cfg.methods:
        rsf_cfg = dpa_config(cfg, base_dir, out)
        rsf_cfg.validate()
        experiment, run = RSFExperiment(), Run(rsf_cfg, "dpa", out)
        experiment.prepare(run)
        run.base_dir = base_dir
        spec = experiment.spec(run)
        jobs["DPA"] = (spec, dataclasses.replace(experiment.runner_config(run), name="DPA", storage_path=runs_dir))
    if "pmorl" in cfg.methods:
        training = dataclasses.replace(cfg.training, steps=2 * cfg.training.steps)
        jobs["P-MORL"] = (build(training, base_dir, "P-MORL", setting["pmorl"], cfg.seed,
                                **({"system": setting["pmorl_system"]} if setting["pmorl_system"] else {})),
                          runner_config(training, cfg.resources, name="P-MORL", storage_path=runs_dir, seed=cfg.seed,
                                        log_every=max(1, training.steps // 4)))
    if "psoups" in cfg.methods:
        for pref in setting["preferences"]:
            jobs[pref] = (build(cfg.training, base_dir, pref, setting["psoups"][pref], cfg.seed),
                          runner_config(cfg.training, cfg.resources, name=pref, storage_path=runs_dir, seed=cfg.seed,
                                        log_every=max(1, cfg.training.steps // 4)))
    return jobs


def train_methods(cfg: FrontsConfig, setting: dict, out: Path) -> tuple[dict[str, Path], dict]:
    """Every run at once (as many as fit), a finished run of the same fingerprint reused: {run: export folder}."""
    from raypref.experiments.soups.training import cause_line, runs_that_fit_now, train_policies

    jobs = training_jobs(cfg, setting, out)
    if not jobs:
        return {}, {}
    _log(f"training {len(jobs)} policies: {', '.join(jobs)}")
    outcomes, reused = train_policies(jobs, cfg.restart, _log,
                                      max_concurrent=cfg.max_concurrent_runs or runs_that_fit_now(cfg.resources))
    failed = {n: cause_line(o) for n, o in outcomes.items() if not o.ok}
    if failed:
        raise RuntimeError(f"FrontsConfig: training failed: {failed}")
    return {n: Path(o.result.export_path) for n, o in outcomes.items()}, outcomes


def _log_training_children(outcomes: dict) -> None:
    for name, outcome in outcomes.items():
        with tracking.child_run(f"policy {name}", kind="policy", params={"run": name}):
            tracking.log_step_metrics(outcome.result.metrics)


# ---------------------------------------------------------------- evaluation: every point on the same prompts

def evaluate_fronts(cfg: FrontsConfig, setting: dict, trained: dict[str, Path]):
    """Each method's points: per w, generations on the held-out prompts (``eval_samples`` each, the
    same sampling seeds for every point), judged. Returns (table rows, {method: [points, prompts, 2]},
    the base's [prompts, 2])."""
    from raypref.models.factory import generate, load_pretrained
    from raypref.models.merge import soup_model

    objectives, prompts = cfg.objectives, setting["eval_prompts"]
    base, tokenizer = load_pretrained(setting["base_dir"])
    base.eval()

    def judged(model, weights=None, direction=None) -> tuple[np.ndarray, dict]:
        asked = weights if direction is None else direction
        queries = [(p, None) if asked is None else _instruction(tokenizer, asked, objectives, p) for p in prompts]
        texts = [t for k in range(cfg.eval_samples)
                 for t in generate(model, tokenizer, [q for q, _ in queries], cfg.max_new_tokens, greedy=False,
                                   seed=cfg.seed + 7919 * k, system=[s for _, s in queries]
                                   if any(s for _, s in queries) else None)]
        asked_prompts = list(prompts) * cfg.eval_samples
        scores = setting["score"](asked_prompts, texts).reshape(cfg.eval_samples, len(prompts), 2).mean(axis=0)
        extra = {"words": float(np.mean([len(t.split()) for t in texts])), "sample": texts[0]}
        if setting["quality"] is not None:
            extra["quality"] = float(setting["quality"](asked_prompts, texts).mean())
        return scores, extra

    grid = weight_grid(cfg.n_weights)
    rows, scores = [], {}
    base_scores, base_extra = judged(base)
    rows.append(_row("base", None, objectives, base_scores, base_extra))
    _log(f"evaluating {len(cfg.methods)} method(s) x {len(grid)} weights on {len(prompts)} held-out prompts")
    models = {}
    if "pmorl" in cfg.methods:
        from peft import PeftModel

        models["pmorl"] = PeftModel.from_pretrained(load_pretrained(setting["base_dir"])[0],
                                                    str(trained["P-MORL"])).merge_and_unload().eval()
    if "dpa" in cfg.methods:
        models["dpa"] = load_pretrained(trained["DPA"])[0].eval()
    first, second = setting["preferences"]
    for method in cfg.methods:
        per_point = []
        for w in grid:
            weights = [w, round(1.0 - w, 2)]
            if method == "psoups":
                soup = {k: v for k, v in ((first, w), (second, 1.0 - w)) if v > 0}
                model = soup_model("exact_lora", base, soup, adapters={k: trained[k] for k in soup})
                point, extra = judged(model)
            elif method == "dpa":
                norm = math.hypot(*weights)
                point, extra = judged(models["dpa"], direction=[weights[0] / norm, weights[1] / norm])
            else:
                point, extra = judged(models.get(method, base), weights=weights)
            per_point.append(point)
            rows.append(_row(method, w, objectives, point, extra))
        scores[method] = np.stack(per_point)
        _log(f"    {LABELS[method]}: " + " ".join(f"({p.mean(0)[0]:.2f},{p.mean(0)[1]:.2f})" for p in per_point))
    return rows, scores, base_scores


def _row(method: str, w, objectives, scores: np.ndarray, extra: dict) -> dict:
    means = scores.mean(axis=0)
    return {"method": method, "w": w, objectives[0]: float(means[0]), objectives[1]: float(means[1]), **extra}


def dominance(points: list[dict], methods: list[str], objectives: list[str]) -> dict[str, list[str]]:
    """For each method, the other methods' points (as "method@w") that one of its points dominates
    (at least as high in both objectives, higher in one)."""
    a, b = objectives
    out = {}
    for m in methods:
        mine = [p for p in points if p["method"] == m]
        out[m] = [f"{q['method']}@{q['w']}" for q in points if q["method"] not in (m,) and any(
            p[a] >= q[a] and p[b] >= q[b] and (p[a] > q[a] or p[b] > q[b]) for p in mine)]
    return out


# ---------------------------------------------------------------- outputs

def write_outputs(cfg: FrontsConfig, out: Path, points: list[dict], intervals: dict) -> dict[str, Path]:
    """fronts.png (every front, the base, the reference), points.csv and points.md."""
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = cfg.objectives
    files = {"plot": out / "fronts.png", "csv": out / "points.csv", "markdown": out / "points.md"}
    fig, ax = plt.subplots(figsize=(8.8, 4.8))
    for m in cfg.methods:
        pts = [p for p in points if p["method"] == m]
        iv = intervals["hypervolume"][m]
        ax.plot([p[a] for p in pts], [p[b] for p in pts], marker="o",
                label=f"{LABELS[m]} (HV {iv['estimate']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}])")
        for p in (pts[0], pts[-1]):
            ax.annotate(f"w={p['w']:g}", (p[a], p[b]), fontsize=7, textcoords="offset points", xytext=(3, 3))
    base = next(p for p in points if p["method"] == "base")
    ax.plot([base[a]], [base[b]], marker="*", markersize=12, color="black", linestyle="", label="base")
    ref = intervals["reference"]
    ax.plot([ref[0]], [ref[1]], marker="x", color="grey", linestyle="", label="reference point")
    ax.set_xlabel(a)
    ax.set_ylabel(b)
    ax.set_title(f"Fronts on {a} x {b} ({cfg.judges}; w = weight on {a})")
    # beside the axes: inside, on real text's crowded points, it covered some of them
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(files["plot"], dpi=120, bbox_inches="tight")
    plt.close(fig)
    columns = ["method", "w", a, b] + [c for c in ("quality", "words") if c in base]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(points)
    atomic.write_text(files["csv"], buf.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for p in points:
        lines.append("| " + " | ".join(LABELS.get(p[c], p[c]) if c == "method" else
                                       ("–" if p[c] is None else f"{p[c]:.3f}" if isinstance(p[c], float) else str(p[c]))
                                       for c in columns) + " |")
    lines += ["", f"Hypervolume w.r.t. ({ref[0]:.3f}, {ref[1]:.3f}), {intervals['level']:.0%} bootstrap interval "
              f"over {intervals['prompts']} prompts ({intervals['n_boot']} replicates):", "",
              "| method | hypervolume | interval |", "|---|---|---|"]
    lines += [f"| {LABELS[m]} | {iv['estimate']:.4f} | [{iv['low']:.4f}, {iv['high']:.4f}] |"
              for m, iv in intervals["hypervolume"].items()]
    atomic.write_text(files["markdown"], "\n".join(lines) + "\n")
    return files
