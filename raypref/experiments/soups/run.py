"""Personalized Soups end to end (P-Soups): the library behind ``jobs/soups.py``.

1. the SFT base (cached by config hash), or a given base policy;
2. each seed's preference pairs: one candidate set labelled by every arm (P-MORL included);
3. one LoRA policy per preference per seed, all trained at once as separate Ray Train runs
   (a failed run is retried from its checkpoint, then reported; finished runs are reused);
4. held-out implicit-reward accuracy of every policy;
5. soups merged post hoc for every combination (P-Soups eq. 5), a weight sweep per dimension,
   and every arm's generations judged (the world's judges, or an LM judge on real data);
   4 and 5 run on Ray workers, an actor per seed with a GPU where the cluster has one
   (``seed_eval``); the driver gathers their numbers;
6. win rates with intervals over prompts and seeds, tables, quality, report, merged models,
   and an MLflow child run per policy and baseline per seed.
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import ray

from raypref import atomic, ray_session, tracking
from raypref.config import to_dict
from raypref.recipes import recipe
from raypref.experiments.soups import evaluate as ev
from raypref.experiments.soups.compare import SOUPS, compare, sweep_over_seeds
from raypref.experiments.soups.config import SoupsConfig
from raypref.experiments.soups.preferences import file_data, pool_data, simulated_data
from raypref.experiments.soups.report import write_report
from raypref.experiments.soups.training import (
    PMORL,
    cause_line,
    run_name,
    runs_that_fit_now,
    train_policies,
    training_jobs,
    training_key,
)
from raypref.experiments.soups.seed_eval import evaluate_on_workers, soup_name  # noqa: F401 (soup_name: the job's API)
from raypref.models.chat import has_chat_template
from raypref.models.factory import check_lora_targets, load_tokenizer
from raypref.recipes.sft import sft_world, train_sft
from raypref.train import storage


@dataclass
class SoupsResult:
    output_dir: Path
    report_path: Path
    run_id: str
    tracking_uri: str
    failed: dict[str, str] = field(default_factory=dict)      # run name -> whole cause line
    excluded: list[str] = field(default_factory=list)         # combinations left out
    reused: list[str] = field(default_factory=list)           # runs not retrained
    sweep: dict = field(default_factory=dict)
    win_rates: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    sft_scores: dict = field(default_factory=dict)            # SFT's mean judge scores
    user_score: float | None = None  # the user soup's score for user_target, mean over seeds


def _log(msg: str) -> None:
    print(f"[soups {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _last_checkpoint_step(runs_dir: str, name: str):
    """Step of the newest committed checkpoint of a run (0 before the first; '?' for remote storage)."""
    if storage.is_uri(runs_dir):
        return "?"
    steps = [int(p.name.split("_")[-1]) for p in (Path(runs_dir) / name).glob("checkpoint_*")
             if p.is_dir() and p.name.split("_")[-1].isdigit()]
    return max(steps, default=0)


def _local_copy(export_path, local: Path) -> Path:
    """The exported adapter as a local folder (downloaded when the runs live at a URI)."""
    if not storage.is_uri(str(export_path)):
        return Path(export_path)
    storage.download_dir(str(export_path), local)
    return local


# ---------------------------------------------------------------- combinations

def usable_combinations(combinations: list[list[str]], trained: list[str]
                        ) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(kept, excluded): a combination with a preference that failed to train is left out
    whole (never judged as a soup of the rest under its own name)."""
    kept = [tuple(c) for c in combinations if set(c) <= set(trained)]
    return kept, [tuple(c) for c in combinations if not set(c) <= set(trained)]


# ---------------------------------------------------------------- the job

def run_soups_job(cfg: SoupsConfig) -> SoupsResult:
    """What ``jobs/soups.py`` runs: the soups run, then where its report and MLflow run are."""
    result = run_soups(cfg)
    print(f"\nreport: {result.report_path}")
    print(f"mlflow: run {result.run_id} in {result.tracking_uri}")
    if result.user_score is not None:
        print(f"user soup {cfg.user_weights}: score {result.user_score:.4f} for the user {cfg.user_target}")
    if result.failed:
        print(f"failed runs: {sorted(result.failed)}; combinations left out of the comparison: "
              f"{result.excluded or 'none'} (a rerun retrains only the failed runs)")
    return result


@dataclass
class TrainedPolicies:
    """Steps 1-3 of the job: the base, the world and prompts, each seed's pairs, and every
    per-preference policy (finished runs of the same fingerprint reused, not retrained)."""

    sft_dir: str
    world: object
    prompts: list[str]
    data: list  # per seed: SeedData
    outcomes: dict
    reused: list[str]
    failed: dict[str, str]  # run name -> whole cause line
    trained: list[dict[str, Path]]  # per seed: {policy: its adapter folder}
    train_seconds: float
    # the base's own judged answers (the pool's, in the text scorer's units), for the sweep's
    # quality at a matched attribute level; None off the pool or without text judges
    reference: dict | None = None
    sweep_prompts: list[str] | None = None  # the weight sweeps' prompts (None: ``prompts``)


def trained_policies(cfg: SoupsConfig, out: Path) -> TrainedPolicies:
    """Steps 1-3 (the soups job's, and a soups sweep trial's): runs live in
    ``<storage_path or out/runs>/<training key>``, so a second call with the same training
    settings reuses every finished run."""
    if not ray.is_initialized():
        # log_to_driver: each run prints its [runner] progress (cli.quiet_console filters the noise)
        ray_session.init(include_dashboard=False, configure_logging=False)
    if cfg.base_policy:
        _log(f"1/6 base policy: {cfg.base_policy}")
        sft_dir = cfg.base_policy
    else:
        _log("1/6 SFT base policy (cached by config hash)")
        sft_dir = str(train_sft(cfg.sft))
    world = sft_world(cfg.sft)
    # the judge and the prompts first: a bad judge folder or prompts file fails before
    # training (the judge itself is loaded by the evaluation workers, not here)
    from_pool = cfg.pairs_source == "pool" and not cfg.psoups_files
    if not cfg.eval.text_judges:
        ev.check_scorer(cfg.eval, world, cfg.preferences)
    prompts = ev.eval_prompts(cfg.eval, world, cfg.pool.prompts if from_pool else None)
    sweep_prompts = ev.eval_prompts(ev.sweep_design(cfg.eval), world, cfg.pool.prompts if from_pool else None)

    _log(f"2/6 preference pairs ({cfg.seeds} seed(s))")
    reference = None
    if cfg.psoups_files:
        data = [file_data(cfg, _log)] * cfg.seeds  # the same files; seeds vary init and sampling
    elif from_pool:
        from raypref.recipes.pool import ensure_pool, resolved

        pool = ensure_pool(resolved(cfg.pool), log=print)
        _log(f"    candidate pool {pool.folder}: {len(pool.candidates)} answers")
        system_message = has_chat_template(load_tokenizer(sft_dir))
        data = [pool_data(cfg, pool, cfg.seed + k, system_message) for k in range(cfg.seeds)]
        reference = base_reference(cfg, pool)
        for name, stats in data[0].stats.items():
            _log(f"    {name}: {stats.n} pairs labelled, {stats.flipped} flipped by label noise, "
                 f"{stats.ties} ties decided by a coin")
    else:
        # a chat-templated base reads P-MORL's instruction as its system message, as at
        # evaluation, whichever method trains it (every per-preference builder takes the rule)
        system_message = bool(cfg.base_policy) and has_chat_template(load_tokenizer(sft_dir))
        data = [simulated_data(cfg, world, cfg.seed + k, system_message) for k in range(cfg.seeds)]
    runs_dir = storage.join(storage.resolve(cfg.storage_path or str(out / "runs")), training_key(cfg))
    jobs = training_jobs(cfg, sft_dir, data, runs_dir)
    fit_now = runs_that_fit_now(cfg.resources)  # re-read before each launch: the cluster may grow
    at_once = cfg.max_concurrent_runs or fit_now
    _log(f"3/6 training {len(jobs)} policies, up to "
         f"{cfg.max_concurrent_runs or f'{fit_now()} (as the cluster is now)'} at once: {', '.join(jobs)}")
    t0 = time.time()
    outcomes, reused = train_policies(
        jobs, cfg.restart, _log, max_concurrent=at_once, on_tick=lambda running: _log("    " + ", ".join(
            f"{n} {_last_checkpoint_step(runs_dir, n)}/{cfg.policy_training.steps}"
            for n in running) + " (steps checkpointed)"))
    train_seconds = time.time() - t0
    failed = {n: cause_line(o) for n, o in outcomes.items() if not o.ok}
    trained = [{p: _local_copy(outcomes[run_name(p, k)].result.export_path,
                               out / "adapters" / run_name(p, k))
                for p in list(data[k].train) + ([PMORL] if data[k].pmorl else [])
                if outcomes[run_name(p, k)].ok} for k in range(cfg.seeds)]
    return TrainedPolicies(sft_dir, world, prompts, data, outcomes, reused, failed, trained,
                           train_seconds, reference, sweep_prompts)


def base_reference(cfg: SoupsConfig, pool) -> dict | None:
    """The pool's judged answers in the text scorer's units: the base's quality at each level
    of an attribute, for the sweep (`compare.sweep_over_seeds`). None when the evaluation is
    not by the text judges or the pool has no quality scores."""
    from raypref.eval.generation import TEXT_KEYS
    from raypref.rewards.text import on_footing

    if not cfg.eval.text_judges or not set(TEXT_KEYS) <= set(pool.scores):
        return None
    return {k: v.tolist() for k, v in on_footing(pool.scores, TEXT_KEYS, cfg.eval.verbosity_words).items()}


def run_soups(cfg: SoupsConfig) -> SoupsResult:
    cfg.validate()
    check_lora_targets(cfg.base_policy or cfg.sft.model.name_or_path, cfg.policy_training.lora,
                       f"{recipe(cfg.algo).section}.lora")
    cfg = dataclasses.replace(cfg, eval=ev.for_seeds(cfg.eval, cfg.seeds))
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tracking.start_run("soups", cfg, out) as run:
        stage = trained_policies(cfg, out)
        sft_dir, world, prompts, data = stage.sft_dir, stage.world, stage.prompts, stage.data
        outcomes, reused, failed, trained = stage.outcomes, stage.reused, stage.failed, stage.trained
        train_seconds = stage.train_seconds
        tracking.log_metrics({f"pairs.{k}": len(v) for k, v in data[0].train.items()})
        tracking.log_metrics({f"label.{k}.{f}": getattr(s, f) for k, s in data[0].stats.items()
                              for f in ("flipped", "ties")})
        if (out / "quarantine").exists():
            tracking.log_artifact(out / "quarantine", "quarantine")

        tracking.log_metrics({"train_seconds": train_seconds, "failed_runs": len(failed),
                              "reused_runs": len(reused)})
        if failed:
            atomic.write_text(out / "failures.json", json.dumps(
                {n: {"cause": failed[n], "error": o.error, "details": o.details}
                 for n, o in outcomes.items() if not o.ok}, indent=2))
            tracking.log_artifact(out / "failures.json")
        # a preference is usable when every seed trained it (intervals need the same arms per seed)
        prefs = [p for p in cfg.preferences if all(p in t for t in trained)]
        if not prefs:
            raise RuntimeError(f"every preference run failed: {failed}")
        combos, excluded = usable_combinations(cfg.combinations, prefs)
        with_pmorl = "pmorl" in cfg.baselines and all(PMORL in t for t in trained)
        for combo in excluded:
            _log(f"    leaving out {'+'.join(combo)}: a preference of it failed to train")

        _log("4-5/6 on the workers: held-out implicit-reward accuracy of each policy, "
             "merging soups and judging generations")
        accuracy, seeds = evaluate_on_workers(cfg, sft_dir, world, trained, [d.held_out for d in data],
                                              prompts, prefs, combos, with_pmorl, out / "merged",
                                              stage.sweep_prompts)
        table = ev.scoring_table(cfg.eval, cfg.preferences)
        comparison = compare([s["methods"] for s in seeds], [s["sft"] for s in seeds], table,
                             len(prompts), cfg.eval.samples_per_prompt,
                             tol=cfg.eval.tie_tolerance, margin=cfg.eval.quality_margin,
                             n_boot=cfg.eval.n_boot, seed=cfg.eval.seed)
        # SFT's quality on the sweep's own prompts and samples (= the win rates' SFT by default)
        sweep_sft_quality = float(np.mean([s["sweep_sft_quality"] for s in seeds]))
        sweep = sweep_over_seeds([s["sweep"] for s in seeds], sweep_sft_quality,
                                 cfg.eval.quality_margin, stage.reference,
                                 n_prompts=len(stage.sweep_prompts or prompts),
                                 n_boot=cfg.eval.n_boot, seed=cfg.eval.seed) if seeds[0]["sweep"] else {}
        for line in comparison.quality_lines:
            _log(f"    quality: {line}")
        _log_summary_metrics(comparison, sweep)
        registered = _register_soups(cfg, seeds[0]["saved"], seeds[0]["soups"])
        _log_children(cfg, data, outcomes, reused, failed, accuracy, seeds, trained)

        _log("6/6 report")
        report = write_report(
            out, cfg=cfg, sweep=sweep, comparison=comparison, accuracy=accuracy, failed=failed,
            excluded=excluded, reused=reused, registered=registered, n_prompts=len(prompts),
            timings={"train_seconds": train_seconds, "total_seconds": time.time() - started},
            samples=seeds[0]["samples"], n_sweep_prompts=len(stage.sweep_prompts or prompts))
        tracking.log_artifact(report.parent, artifact_path="report")
        tracking.log_metrics({"total_seconds": time.time() - started})
        sft_rows = [r for s in seeds for r in s["sft"]]
        user_scores = [s["user_score"] for s in seeds if s["user_score"] is not None]
        user_score = sum(user_scores) / len(user_scores) if user_scores else None
        if user_score is not None:
            tracking.log_metrics({"user_score": user_score})
        result = SoupsResult(
            out, report, run.info.run_id, tracking.tracking_uri(out), failed,
            ["+".join(c) for c in excluded], reused, sweep,
            {"names": comparison.names, "rates": comparison.rates.tolist(),
             "intervals": {f"{a} vs {b}": i.text() for (a, b), i in comparison.intervals.items()}},
            comparison.quality, ev.mean_scores(sft_rows), user_score)
    return result


def metric_name(arm: str) -> str:
    """An arm's name as MLflow accepts it in a metric key: "P-Soups+instr" -> "P-Soups_instr",
    "P-Soups (A/B avg)" -> "P-Soups_A_B_avg"."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_.-]", "_", arm)).strip("_")


def _log_summary_metrics(comparison, sweep) -> None:
    tracking.log_metrics({f"sweep.{dim}.monotonic": float(row["monotonic"]) for dim, row in sweep.items()})
    tracking.log_metrics({f"sweep.{dim}.monotonic_matched": float(row["monotonic_matched"])
                          for dim, row in sweep.items() if "monotonic_matched" in row})
    tracking.log_metrics({f"quality.{metric_name(name)}": q for name, q in comparison.quality.items()})
    for (a, b), interval in comparison.intervals.items():
        if a == SOUPS and interval.estimate is not None:
            b = metric_name(b)
            tracking.log_metrics({f"win_rate.{b}": interval.estimate,
                                  f"win_rate.{b}.low": interval.low,
                                  f"win_rate.{b}.high": interval.high})


def _log_children(cfg, data, outcomes, reused, failed, accuracy, seeds, trained) -> None:
    """A child MLflow run per preference policy and per baseline, per seed, named for what it
    is: its params, step metrics, adapter and evaluation; failed runs end FAILED with the cause."""
    for k, seed_data in enumerate(data):
        policies = list(seed_data.train) + ([PMORL] if seed_data.pmorl is not None else [])
        for policy in policies:
            name = run_name(policy, k)
            outcome = outcomes[name]
            is_baseline = policy == PMORL
            pairs = seed_data.pmorl if is_baseline else seed_data.train[policy]
            label = f"{'baseline' if is_baseline else 'policy'} {policy} seed {k}"
            with tracking.child_run(label, kind="baseline" if is_baseline else "policy",
                                    params={"preference": policy, "seed": cfg.seed + k, "run": name,
                                            "algo": cfg.algo, "pairs": len(pairs),
                                            "reused": name in reused, "training": to_dict(cfg.policy_training)},
                                    tags={"raypref.seed": str(k)}) as child:
                if outcome.ok:
                    tracking.log_step_metrics(outcome.result.metrics)
                    tracking.log_artifact(trained[k][policy], artifact_path="adapter")
                    if policy in accuracy[k]:
                        tracking.log_metrics({f"heldout.{m}": v for m, v in accuracy[k][policy].items()})
                    if is_baseline and PMORL in seeds[k]["methods"]:
                        _log_eval_means(seeds[k]["methods"][PMORL])
                else:
                    mlflow.set_tag("raypref.failure", failed[name][:5000])
            if not outcome.ok:
                mlflow.MlflowClient().set_terminated(child.info.run_id, "FAILED")
        for baseline in ("SFT", "Prompting"):
            if baseline in seeds[k]["methods"]:
                params = to_dict(cfg.sft) if baseline == "SFT" and not cfg.base_policy \
                    else {"base_policy": cfg.base_policy or "sft"}
                with tracking.child_run(f"baseline {baseline} seed {k}", kind="baseline",
                                        params={**params, "seed": cfg.seed + k},
                                        tags={"raypref.seed": str(k)}):
                    _log_eval_means(seeds[k]["methods"][baseline])


def _log_eval_means(by_combo: dict) -> None:
    rows = [r for rows in by_combo.values() for r in rows]
    if rows:
        tracking.log_metrics({f"eval.{key}": v for key, v in ev.mean_scores(rows).items()})


def _register_soups(cfg, saved: dict[str, str], soups: dict[str, dict[str, float]]) -> list[str]:
    """Seed 0's merged soups (written by its evaluation worker) into the MLflow model registry."""
    if cfg.register_models:
        for name, path in saved.items():
            tracking.register_model_dir(Path(path), name, tags={
                "soup_weights": json.dumps(soups[name]), "merge_method": cfg.merge_method})
    return list(saved)
