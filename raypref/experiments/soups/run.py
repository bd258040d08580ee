"""Personalized Soups end to end (seed 002): the library behind ``jobs/soups.py``.

1. the SFT base (cached by config hash);
2. preference pairs per preference (simulated world, or P-Soups files) + P-MORL pairs;
3. one LoRA policy per preference, all trained at once as separate Ray Train runs
   (a failed run is retried from its checkpoint, then reported; the rest go on);
4. soups merged post hoc for every combination (002 eq. 5) and a weight sweep per dimension;
5. generations of soups and baselines judged by the world; aggregated win rates (002 §E.1);
6. report + plots + merged models (safetensors, MLflow registry).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from raypref import tracking
from raypref.data.loaders import load_validated
from raypref.data.records import PreferenceRecord
from raypref.data.users import psoups_profile
from raypref.data.world import World
from raypref.models.factory import load_pretrained, save_pretrained_safetensors
from raypref.eval.pairs import evaluate_pairs
from raypref.recipes import recipe
from raypref.recipes.sft import train_sft
from raypref.train import storage
from raypref.train.faults import FaultInjectingSpec
from raypref.train.runner import RunnerConfig, runner_config
from raypref.train.spec import LoopSpec
from raypref.experiments.soups import evaluate as ev
from raypref.experiments.soups.config import SoupsConfig
from raypref.models.merge import LoraAdapter, merge
from raypref.train.concurrent import train_concurrently
from raypref.experiments.soups.preferences import pmorl_pairs, preference_table
from raypref.experiments.soups.report import write_report
from raypref.eval.winrate import win_rate_matrix

PMORL = "P-MORL"


@dataclass
class SoupsResult:
    output_dir: Path
    report_path: Path
    run_id: str
    tracking_uri: str
    failed: dict[str, str] = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    win_rates: dict = field(default_factory=dict)


def _log(msg: str) -> None:
    print(f"[soups {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- data

def preference_data(cfg: SoupsConfig, world: World
                    ) -> dict[str, tuple[list[PreferenceRecord], list[PreferenceRecord]]]:
    """{preference: (train pairs, held-out pairs)}."""
    data = {}
    n = cfg.pairs_per_preference
    for i, name in enumerate(cfg.preferences):
        if cfg.psoups_files:
            if name not in cfg.psoups_files:
                raise ValueError(f"psoups_files has no file for preference {name!r}; "
                                 f"it has {sorted(cfg.psoups_files)}")
            # every row validated; bad ones quarantined with file and line, too many stop the job
            records, summary = load_validated(
                cfg.psoups_files[name], schema="psoups", preference=name,
                quarantine_path=Path(cfg.output_dir).resolve() / "quarantine" / f"{name}.jsonl",
                max_quarantine_fraction=cfg.max_quarantine_fraction)
            _log(f"    {name}: {summary['rows_valid']}/{summary['rows_total']} rows valid, "
                 f"{summary['rows_quarantined']} quarantined {summary['by_reason']} -> {summary['path']}")
            if len(records) < 2:
                raise ValueError(f"psoups_files.{name}={cfg.psoups_files[name]}: {len(records)} valid "
                                 "pairs, at least 2 are needed (train + held-out)")
            cut = max(1, len(records) // 10)
            data[name] = (records[:-cut], records[-cut:])
        else:
            rng = np.random.default_rng([cfg.seed, i])
            records = world.pairs_for_preference(name, n + max(1, n // 10), rng)
            data[name] = (records[:n], records[n:])
    return data


# ---------------------------------------------------------------- training

def training_jobs(cfg: SoupsConfig, sft_dir: str, data: dict, pmorl: list[PreferenceRecord] | None,
                  runs_dir: str) -> dict[str, tuple[LoopSpec, RunnerConfig]]:
    """{run name: (loop spec, runner config)} for every preference (+ P-MORL)."""
    sets = {name: train for name, (train, _) in data.items()}
    if pmorl is not None:
        sets[PMORL] = pmorl
    build = recipe(cfg.algo).per_preference
    jobs = {}
    for name, pairs in sets.items():
        spec = build(cfg.training, str(sft_dir), name, pairs, cfg.seed)
        runner_cfg = runner_config(cfg.training, cfg.resources, name=name, storage_path=runs_dir,
                                   seed=cfg.seed, log_every=max(1, cfg.training.steps // 4))
        if name in cfg.inject_failures:
            spec = FaultInjectingSpec(spec, cfg.inject_failures[name],
                                      marker=str(Path(cfg.output_dir).resolve() / f".injected-{name}"))
        jobs[name] = (spec, runner_cfg)
    return jobs


def training_key(cfg: SoupsConfig) -> str:
    """Runs live in ``runs/<key>``: re-running the same training config resumes each run
    from its latest checkpoint (Ray Train resumes a run by storage path + name); any change
    to what is trained starts new runs. Evaluation settings are not part of the key."""
    from raypref.config import config_hash, to_dict

    d = to_dict(cfg)
    keep = ("seed", "algo", "preferences", "combinations", "baselines", "base_policy",
            "psoups_files", "sft", "training", "pairs_per_preference")
    return "train-" + config_hash({k: d[k] for k in keep})


def _last_checkpoint_step(runs_dir: str, name: str) -> int:
    """Step of the newest committed checkpoint of a run (0 before the first; '?' for remote storage)."""
    if storage.is_uri(runs_dir):
        return "?"
    run_dir = Path(runs_dir) / name
    steps = [int(p.name.split("_")[-1]) for p in run_dir.glob("checkpoint_*") if p.is_dir()
             and p.name.split("_")[-1].isdigit()]
    return max(steps, default=0)


def _local_copy(export_path, local: Path) -> Path:
    """The exported adapter as a local folder (downloaded when the runs live at a URI)."""
    if not storage.is_uri(str(export_path)):
        return Path(export_path)
    storage.download_dir(str(export_path), local)
    return local


# ---------------------------------------------------------------- merging

def soup_name(weights: dict[str, float]) -> str:
    """A name that states the weights, e.g. psoups-P1A_0p333-P2B_0p333-P3A_0p333
    (MLflow model names may not contain '.')."""
    parts = [f"{k}_{v:.3f}".replace(".", "p") for k, v in sorted(weights.items()) if v > 0]
    return "psoups-" + "-".join(parts)


def over_trained(weights: dict[str, float], trained: list[str]) -> dict[str, float]:
    """Weights restricted to trained preferences and renormalized to sum to 1 (a failed
    preference cannot be in a soup); {} when none of them was trained."""
    usable = {k: v for k, v in weights.items() if k in trained and v > 0}
    total = sum(usable.values())
    return {k: v / total for k, v in usable.items()} if total > 0 else {}


class Souper:
    """Merges soups from the trained adapters on the shared SFT base."""

    def __init__(self, cfg: SoupsConfig, sft_dir: Path, adapters: dict[str, Path]):
        self.cfg = cfg
        self.base_model, self.tokenizer = load_pretrained(sft_dir)
        self.base_model.eval()
        self.base_state = {k: v.detach().clone() for k, v in self.base_model.state_dict().items()}
        self.adapters = {name: LoraAdapter.from_dir(path) for name, path in adapters.items()}

    def model(self, weights: dict[str, float]) -> torch.nn.Module:
        """The soup Σ wᵢ πᵢ (weights over trained preferences, validated by ``merge``)."""
        state = merge(self.cfg.merge_method, weights, base=self._base_for_method(),
                      adapters={k: self.adapters[k] for k in weights},
                      density=self.cfg.merge_density)
        return ev.with_weights(self.base_model, state)

    def _base_for_method(self):
        return self.base_model if self.cfg.merge_method in ("ties", "dare_ties", "dare_linear") \
            else self.base_state


# ---------------------------------------------------------------- the job

def run_soups(cfg: SoupsConfig) -> SoupsResult:
    cfg.validate()
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tracking.start_run("soups", cfg, out) as run:
        if not ray.is_initialized():
            # log_to_driver: each run prints its [runner] progress (cli.quiet_console filters the noise)
            ray.init(include_dashboard=False, configure_logging=False)

        if cfg.base_policy:
            _log(f"1/6 base policy: {cfg.base_policy}")
            sft_dir = cfg.base_policy
        else:
            _log("1/6 SFT base policy (cached by config hash)")
            sft_dir = str(train_sft(cfg.sft))
        world = World(seed=cfg.sft.world_seed, difficulty=cfg.sft.difficulty)

        _log("2/6 preference pairs")
        data = preference_data(cfg, world)
        pmorl = None
        if "pmorl" in cfg.baselines:
            combos = cfg.combinations
            n = cfg.pairs_per_preference
            pmorl = pmorl_pairs(world, combos, n, np.random.default_rng([cfg.seed, 99]))
        counts = {f"pairs.{k}": len(v[0]) for k, v in data.items()}
        tracking.log_metrics(counts)
        if (out / "quarantine").exists():
            tracking.log_artifact(out / "quarantine", "quarantine")

        names = list(data) + ([PMORL] if pmorl is not None else [])
        _log(f"3/6 training {len(names)} policies concurrently: {', '.join(names)}")
        runs_dir = storage.join(storage.resolve(cfg.storage_path or str(out / "runs")), training_key(cfg))
        if storage.exists(runs_dir):
            _log(f"    resuming the runs in {runs_dir} (same training config)")
        t0 = time.time()
        outcomes = train_concurrently(
            training_jobs(cfg, sft_dir, data, pmorl, runs_dir),
            on_done=lambda o: _log(f"    {o.name}: {'done' if o.ok else 'FAILED: ' + o.error} "
                                   f"({o.seconds:.0f} s)"),
            on_tick=lambda running: _log("    " + ", ".join(
                f"{n} {_last_checkpoint_step(runs_dir, n)}/{cfg.training.steps}"
                for n in running) + " (steps checkpointed)"),
            restart=cfg.restart)
        train_seconds = time.time() - t0
        failed = {n: o.error for n, o in outcomes.items() if not o.ok}
        trained = {n: _local_copy(o.result.export_path, out / "adapters" / n)
                   for n, o in outcomes.items() if o.ok}
        for name, o in outcomes.items():
            if o.ok:
                for row in o.result.metrics:
                    tracking.log_metrics({f"{name}.{k}": v for k, v in row.items() if k != "step"},
                                         step=int(row["step"]))
        tracking.log_metrics({"train_seconds": train_seconds, "failed_runs": len(failed)})
        if failed:
            (out / "failures.json").write_text(json.dumps(
                {n: {"error": o.error, "details": o.details} for n, o in outcomes.items() if not o.ok},
                indent=2))
            tracking.log_artifact(out / "failures.json")
        soup_prefs = [p for p in cfg.preferences if p in trained]
        if not soup_prefs:
            raise RuntimeError(f"every preference run failed: {failed}")

        _log("4/6 held-out implicit-reward accuracy of each policy")
        souper = Souper(cfg, sft_dir, {p: trained[p] for p in soup_prefs})
        accuracy = _heldout_accuracy(cfg, sft_dir, trained, data, soup_prefs)
        tracking.log_metrics({f"heldout_reward_accuracy.{k}": v["reward_accuracy"]
                              for k, v in accuracy.items()})

        _log("5/6 merging soups and judging generations")
        prompts = world.prompts(cfg.eval.n_prompts, split="test")
        sweep = _weight_sweep(cfg, souper, world, prompts, soup_prefs)
        methods, soups, samples = _compare_methods(cfg, souper, world, prompts, soup_prefs, trained)
        table = preference_table(cfg.preferences)
        names_, rates, details = win_rate_matrix(methods, table, tol=cfg.eval.tie_tolerance)
        models_dir = out / "merged"
        registered = _save_soups(cfg, souper, soups, models_dir)

        _log("6/6 report")
        report = write_report(
            out, cfg=cfg, sweep=sweep, win_names=names_, win_rates=rates, win_details=details,
            accuracy=accuracy, failed=failed, registered=registered,
            timings={"train_seconds": train_seconds, "total_seconds": time.time() - started},
            samples=samples)
        tracking.log_artifact(report.parent, artifact_path="report")
        tracking.log_metrics({"total_seconds": time.time() - started})
        result = SoupsResult(out, report, run.info.run_id, tracking.tracking_uri(out), failed,
                             sweep, {"names": names_, "rates": rates.tolist()})
    return result


def _heldout_accuracy(cfg, sft_dir, trained, data, prefs) -> dict[str, dict[str, float]]:
    from peft import PeftModel

    out = {}
    for name in prefs:
        base, tokenizer = load_pretrained(sft_dir)
        model = PeftModel.from_pretrained(base, str(trained[name]))
        out[name] = evaluate_pairs(model, tokenizer, data[name][1], cfg.training.beta,
                                   max_length=cfg.training.max_length)
        _log(f"    {name}: held-out reward accuracy {out[name]['reward_accuracy']:.3f}")
    return out


def _weight_sweep(cfg, souper, world, prompts, prefs) -> dict:
    """For each dimension: judge score of its attribute vs the merge weight of the
    preference raising it (other dimensions held at 50/50)."""
    dims = ev.dimensions_of(prefs)
    sweep = {}
    for dim, (up, down) in dims.items():
        attribute = psoups_profile(up).attribute
        values = []
        for t in cfg.eval.weight_grid:
            model = souper.model(ev.sweep_weights(dims, dim, t))
            _, scores = ev.judged_generations(world, model, souper.tokenizer, prompts, cfg.eval)
            values.append(ev.mean_scores(scores)[attribute])
        monotonic = ev.is_monotonic(values, increasing=True)
        sweep[dim] = {"attribute": attribute, "raised_by": up, "lowered_by": down,
                      "weights": list(cfg.eval.weight_grid), "scores": values,
                      "monotonic": monotonic}
        _log(f"    {dim}: {attribute} = " + ", ".join(f"{v:.3f}" for v in values)
             + f" for w({up}) = {cfg.eval.weight_grid} -> monotonic: {monotonic}")
        tracking.log_metrics({f"sweep.{dim}.monotonic": float(monotonic)})
    return sweep


def _compare_methods(cfg, souper, world, prompts, prefs, trained):
    """Judge scores per method per combination (for win rates), the soups' weights, and a few
    generations per method and combination for the report."""
    methods: dict[str, dict[tuple, list]] = {"P-Soups": {}}
    if "sft" in cfg.baselines:
        methods["SFT"] = {}
    if "prompting" in cfg.baselines:
        methods["Prompting"] = {}
    pmorl_model = None
    if "pmorl" in cfg.baselines and PMORL in trained:
        from peft import PeftModel

        base, _ = load_pretrained(Path(json.loads(
            (Path(trained[PMORL]) / "soup_policy.json").read_text())["sft_dir"]))
        pmorl_model = PeftModel.from_pretrained(base, str(trained[PMORL])).merge_and_unload().eval()
        methods[PMORL] = {}
    samples: dict[str, list[str]] = {}
    k = 3
    _, sft_scores = ev.judged_generations(world, souper.base_model, souper.tokenizer, prompts, cfg.eval)
    soups: dict[str, dict[str, float]] = {}
    for combo in map(tuple, cfg.combinations):
        # judged on all of the combination's preferences, even where one failed to train
        weights = over_trained({p: 1.0 / len(combo) for p in combo}, prefs)
        if not weights:
            _log(f"    skipping {'+'.join(combo)}: none of its preferences trained")
            continue
        soups[soup_name(weights)] = weights
        texts, scores = ev.judged_generations(world, souper.model(weights), souper.tokenizer,
                                              prompts, cfg.eval)
        methods["P-Soups"][combo] = scores
        samples[f"P-Soups {'+'.join(combo)}"] = texts[:k]
        instruction = world.preference_instruction(list(combo))
        if "SFT" in methods:
            methods["SFT"][combo] = sft_scores
        if "Prompting" in methods:
            texts, methods["Prompting"][combo] = ev.judged_generations(
                world, souper.base_model, souper.tokenizer, prompts, cfg.eval, instruction)
            samples[f"Prompting {'+'.join(combo)}"] = texts[:k]
        if pmorl_model is not None:
            texts, methods[PMORL][combo] = ev.judged_generations(
                world, pmorl_model, souper.tokenizer, prompts, cfg.eval, instruction)
            samples[f"P-MORL {'+'.join(combo)}"] = texts[:k]
        _log(f"    judged {'+'.join(combo)}")
    if cfg.user_weights:
        from raypref.models.merge import validate_weights

        validate_weights(cfg.user_weights, cfg.preferences)  # a user's typo is an error
        weights = over_trained(cfg.user_weights, prefs)
        if weights:
            soups[soup_name(weights)] = weights
    return methods, soups, samples


def _save_soups(cfg, souper, soups: dict[str, dict[str, float]], models_dir: Path) -> list[str]:
    """Merged policies as safetensors folders; registered in the MLflow model registry."""
    saved = []
    for name, weights in soups.items():
        model = souper.model(weights)
        path = save_pretrained_safetensors(model, souper.tokenizer, models_dir / name)
        (path / "soup_weights.json").write_text(json.dumps(weights, indent=2))
        if cfg.register_models:
            tracking.register_model_dir(path, name, tags={
                "soup_weights": json.dumps(weights), "merge_method": cfg.merge_method})
        saved.append(name)
    return saved
