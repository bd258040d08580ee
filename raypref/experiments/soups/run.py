"""Personalized Soups end to end (P-Soups): the library behind ``jobs/soups.py``.

1. the SFT base (cached by config hash), or a given base policy;
2. each seed's preference pairs: one candidate set labelled by every arm (P-MORL included);
3. one LoRA policy per preference per seed, all trained at once as separate Ray Train runs
   (a failed run is retried from its checkpoint, then reported; finished runs are reused);
4. held-out implicit-reward accuracy of every policy;
5. soups merged post hoc for every combination (P-Soups eq. 5), a weight sweep per dimension,
   and every arm's generations judged (the world's judges, or an LM judge on real data);
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
import ray
import torch

from raypref import atomic, ray_session, tracking
from raypref.config import to_dict
from raypref.recipes import recipe
from raypref.recipes.method import PAIRS
from raypref.recipes.dpo import evaluate_pairs
from raypref.experiments.soups import evaluate as ev
from raypref.experiments.soups.compare import SOUPS, compare, sweep_over_seeds
from raypref.experiments.soups.config import SoupsConfig
from raypref.experiments.soups.preferences import file_data, simulated_data
from raypref.experiments.soups.report import write_report
from raypref.experiments.soups.training import (
    PMORL,
    cause_line,
    run_name,
    runs_that_fit,
    train_policies,
    training_jobs,
    training_key,
)
from raypref.models.chat import has_chat_template
from raypref.models.factory import check_lora_targets, load_pretrained, load_tokenizer, save_pretrained_safetensors
from raypref.models.merge import LoraAdapter, soup_model
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


# ---------------------------------------------------------------- merging

def soup_name(weights: dict[str, float]) -> str:
    """A name that states the weights, e.g. psoups-P1A_0p333-P2B_0p333-P3A_0p333
    (MLflow model names may not contain '.')."""
    parts = [f"{k}_{v:.3f}".replace(".", "p") for k, v in sorted(weights.items()) if v > 0]
    return "psoups-" + "-".join(parts)


def usable_combinations(combinations: list[list[str]], trained: list[str]
                        ) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(kept, excluded): a combination with a preference that failed to train is left out
    whole (never judged as a soup of the rest under its own name)."""
    kept = [tuple(c) for c in combinations if set(c) <= set(trained)]
    return kept, [tuple(c) for c in combinations if not set(c) <= set(trained)]


class Souper:
    """Merges soups from the trained adapters on the shared SFT base."""

    def __init__(self, cfg: SoupsConfig, sft_dir, adapters: dict[str, Path]):
        self.cfg = cfg
        self.base_model, self.tokenizer = load_pretrained(sft_dir)
        self.base_model.eval()
        self.adapters = {name: LoraAdapter.from_dir(path) for name, path in adapters.items()}

    def model(self, weights: dict[str, float], method: str | None = None) -> torch.nn.Module:
        """The soup Σ wᵢ πᵢ by ``method`` (default: the config's merge method)."""
        # the base module itself (not a clone of its state): tied weights and each module's type
        # stay visible to the merge, so an adapter on a tied embedding also updates the head
        return soup_model(method or self.cfg.merge_method, self.base_model, weights,
                          adapters={k: self.adapters[k] for k in weights}, density=self.cfg.merge_density)


# ---------------------------------------------------------------- the job

def run_soups_job(cfg: SoupsConfig) -> SoupsResult:
    """What ``jobs/soups.py`` runs: the soups run, then where its report and MLflow run are."""
    result = run_soups(cfg)
    print(f"\nreport: {result.report_path}")
    print(f"mlflow: run {result.run_id} in {result.tracking_uri}")
    if result.failed:
        print(f"failed runs: {sorted(result.failed)}; combinations left out of the comparison: "
              f"{result.excluded or 'none'} (a rerun retrains only the failed runs)")
    return result


def run_soups(cfg: SoupsConfig) -> SoupsResult:
    cfg.validate()
    check_lora_targets(cfg.base_policy or cfg.sft.model.name_or_path, cfg.policy_training.lora,
                       f"{recipe(cfg.algo).section}.lora")
    cfg = dataclasses.replace(cfg, eval=ev.for_seeds(cfg.eval, cfg.seeds))
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tracking.start_run("soups", cfg, out) as run:
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
        # the judge and the prompts first: a bad judge id or prompts file fails before training
        scorer = ev.make_scorer(cfg.eval, world, cfg.preferences)
        prompts = ev.eval_prompts(cfg.eval, world)

        _log(f"2/6 preference pairs ({cfg.seeds} seed(s))")
        if cfg.psoups_files:
            data = [file_data(cfg, _log)] * cfg.seeds  # the same files; seeds vary init and sampling
        else:
            # a chat-templated base reads P-MORL's instruction as its system message, as at evaluation
            system_message = (bool(cfg.base_policy) and recipe(cfg.algo).data == PAIRS
                              and has_chat_template(load_tokenizer(sft_dir)))
            data = [simulated_data(cfg, world, cfg.seed + k, system_message) for k in range(cfg.seeds)]
        tracking.log_metrics({f"pairs.{k}": len(v) for k, v in data[0].train.items()})
        tracking.log_metrics({f"label.{k}.{f}": getattr(s, f) for k, s in data[0].stats.items()
                              for f in ("flipped", "ties")})
        if (out / "quarantine").exists():
            tracking.log_artifact(out / "quarantine", "quarantine")

        runs_dir = storage.join(storage.resolve(cfg.storage_path or str(out / "runs")), training_key(cfg))
        jobs = training_jobs(cfg, sft_dir, data, runs_dir)
        at_once = cfg.max_concurrent_runs or runs_that_fit(cfg.resources, ray.cluster_resources())
        _log(f"3/6 training {len(jobs)} policies, up to {at_once} at once: {', '.join(jobs)}")
        t0 = time.time()
        outcomes, reused = train_policies(
            jobs, cfg.restart, _log, max_concurrent=at_once, on_tick=lambda running: _log("    " + ", ".join(
                f"{n} {_last_checkpoint_step(runs_dir, n)}/{cfg.policy_training.steps}"
                for n in running) + " (steps checkpointed)"))
        train_seconds = time.time() - t0
        failed = {n: cause_line(o) for n, o in outcomes.items() if not o.ok}
        tracking.log_metrics({"train_seconds": train_seconds, "failed_runs": len(failed),
                              "reused_runs": len(reused)})
        if failed:
            atomic.write_text(out / "failures.json", json.dumps(
                {n: {"cause": failed[n], "error": o.error, "details": o.details}
                 for n, o in outcomes.items() if not o.ok}, indent=2))
            tracking.log_artifact(out / "failures.json")
        trained = [{p: _local_copy(outcomes[run_name(p, k)].result.export_path,
                                   out / "adapters" / run_name(p, k))
                    for p in list(data[k].train) + ([PMORL] if data[k].pmorl else [])
                    if outcomes[run_name(p, k)].ok} for k in range(cfg.seeds)]
        # a preference is usable when every seed trained it (intervals need the same arms per seed)
        prefs = [p for p in cfg.preferences if all(p in t for t in trained)]
        if not prefs:
            raise RuntimeError(f"every preference run failed: {failed}")
        combos, excluded = usable_combinations(cfg.combinations, prefs)
        with_pmorl = "pmorl" in cfg.baselines and all(PMORL in t for t in trained)
        for combo in excluded:
            _log(f"    leaving out {'+'.join(combo)}: a preference of it failed to train")

        _log("4/6 held-out implicit-reward accuracy of each policy")
        accuracy = [{p: _heldout_accuracy(cfg, sft_dir, t[p], d.held_out[p], run_name(p, k))
                     for p in prefs} for k, (t, d) in enumerate(zip(trained, data))]

        _log("5/6 merging soups and judging generations")
        seeds = [_evaluate_seed(cfg, k, sft_dir, trained[k], scorer, world, prompts, prefs,
                                combos, with_pmorl) for k in range(cfg.seeds)]
        table = scorer.table(cfg.preferences)
        comparison = compare([s["methods"] for s in seeds], [s["sft"] for s in seeds], table,
                             len(prompts), cfg.eval.samples_per_prompt,
                             tol=cfg.eval.tie_tolerance, margin=cfg.eval.quality_margin,
                             n_boot=cfg.eval.n_boot, seed=cfg.eval.seed)
        sweep = sweep_over_seeds([s["sweep"] for s in seeds], comparison.quality["SFT"],
                                 cfg.eval.quality_margin) if seeds[0]["sweep"] else {}
        for line in comparison.quality_lines:
            _log(f"    quality: {line}")
        _log_summary_metrics(comparison, sweep)
        registered = _save_soups(cfg, seeds[0]["souper"], seeds[0]["soups"], out / "merged")
        _log_children(cfg, data, outcomes, reused, failed, accuracy, seeds, trained)

        _log("6/6 report")
        report = write_report(
            out, cfg=cfg, sweep=sweep, comparison=comparison, accuracy=accuracy, failed=failed,
            excluded=excluded, reused=reused, registered=registered, n_prompts=len(prompts),
            timings={"train_seconds": train_seconds, "total_seconds": time.time() - started},
            samples=seeds[0]["samples"])
        tracking.log_artifact(report.parent, artifact_path="report")
        tracking.log_metrics({"total_seconds": time.time() - started})
        sft_rows = [r for s in seeds for r in s["sft"]]
        result = SoupsResult(
            out, report, run.info.run_id, tracking.tracking_uri(out), failed,
            ["+".join(c) for c in excluded], reused, sweep,
            {"names": comparison.names, "rates": comparison.rates.tolist(),
             "intervals": {f"{a} vs {b}": i.text() for (a, b), i in comparison.intervals.items()}},
            comparison.quality, ev.mean_scores(sft_rows))
    return result


def _heldout_accuracy(cfg, sft_dir, adapter: Path, pairs, name: str) -> dict[str, float]:
    from peft import PeftModel

    base, tokenizer = load_pretrained(sft_dir)
    model = PeftModel.from_pretrained(base, str(adapter))
    result = evaluate_pairs(model, tokenizer, pairs, cfg.training.beta,
                            max_length=cfg.training.max_length)
    _log(f"    {name}: held-out reward accuracy {result['reward_accuracy']:.3f}")
    return result


def _evaluate_seed(cfg, k, sft_dir, trained, scorer, world, prompts, prefs, combos, with_pmorl) -> dict:
    """Seed k's judged scores of every arm, its weight sweep and a few samples."""
    eval_cfg = dataclasses.replace(cfg.eval, seed=cfg.eval.seed + cfg.seed + k)
    souper = Souper(cfg, sft_dir, {p: trained[p] for p in prefs})

    def generate(model, instruction=None):
        return ev.judged_generations(scorer, model, souper.tokenizer, prompts, eval_cfg, instruction)

    _, sft = generate(souper.base_model)
    sweep = _weight_sweep(cfg, souper, scorer, generate, prefs, k)
    arms = [SOUPS] + [ev.SOUP_ARMS[a] for a in cfg.eval.arms
                      if not (a == "ab_avg" and cfg.merge_method == "lora_factors_linear")]
    names = arms + [n for n, on in (("SFT", "sft" in cfg.baselines),
                                    ("Prompting", "prompting" in cfg.baselines),
                                    (PMORL, with_pmorl)) if on]
    methods = {n: {} for n in names}
    pmorl_model = _pmorl_model(sft_dir, trained[PMORL]) if with_pmorl else None
    samples, soups = {}, {}
    hf_base = bool(cfg.base_policy)
    for combo in combos:
        weights = {p: 1.0 / len(combo) for p in combo}
        soups[soup_name(weights)] = weights
        instruction = ev.instruction_text(world, combo, hf_base)
        soup = souper.model(weights)
        for name in names:
            if name == "SFT":
                texts, methods[name][combo] = None, sft
                continue
            model = {SOUPS: soup, ev.SOUP_ARMS["instructed"]: soup, PMORL: pmorl_model,
                     "Prompting": souper.base_model}.get(name)
            if name == ev.SOUP_ARMS["ab_avg"]:
                model = souper.model(weights, "lora_factors_linear")
            instructed = name in (ev.SOUP_ARMS["instructed"], "Prompting", PMORL)
            texts, methods[name][combo] = generate(model, instruction if instructed else None)
            if k == 0:
                samples[f"{name} {'+'.join(combo)}"] = texts[:3]
        _log(f"    seed {k}: judged {'+'.join(combo)}")
    if cfg.user_weights:
        if set(cfg.user_weights) <= set(prefs):
            soups[soup_name(cfg.user_weights)] = dict(cfg.user_weights)
        else:
            _log(f"    not building the user soup {cfg.user_weights}: "
                 f"{sorted(set(cfg.user_weights) - set(prefs))} failed to train")
    return {"methods": methods, "sft": sft, "sweep": sweep, "samples": samples,
            "soups": soups, "souper": souper}


def _pmorl_model(sft_dir, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel

    base, _ = load_pretrained(sft_dir)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def _weight_sweep(cfg, souper, scorer, generate, prefs, k) -> dict:
    """For each dimension: judge score of its attribute (and quality) vs the merge weight of
    the preference raising it (other dimensions held at 50/50)."""
    dims = ev.dimensions_of(prefs)
    sweep = {}
    for dim, (up, down) in dims.items():
        key = scorer.sweep_key(up)
        values, quality = [], []
        for t in cfg.eval.weight_grid:
            _, scores = generate(souper.model(ev.sweep_weights(dims, dim, t)))
            means = ev.mean_scores(scores)
            values.append(means[key])
            quality.append(means["quality"])
        sweep[dim] = {"attribute": key, "raised_by": up, "lowered_by": down,
                      "weights": list(cfg.eval.weight_grid), "scores": values, "quality": quality}
        _log(f"    seed {k} {dim}: {key} = " + ", ".join(f"{v:.3f}" for v in values)
             + ", quality = " + ", ".join(f"{q:.3f}" for q in quality)
             + f" for w({up}) = {cfg.eval.weight_grid}")
    return sweep


def metric_name(arm: str) -> str:
    """An arm's name as MLflow accepts it in a metric key: "P-Soups+instr" -> "P-Soups_instr",
    "P-Soups (A/B avg)" -> "P-Soups_A_B_avg"."""
    return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_.-]", "_", arm)).strip("_")


def _log_summary_metrics(comparison, sweep) -> None:
    tracking.log_metrics({f"sweep.{dim}.monotonic": float(row["monotonic"]) for dim, row in sweep.items()})
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


def _save_soups(cfg, souper, soups: dict[str, dict[str, float]], models_dir: Path) -> list[str]:
    """Seed 0's merged policies as safetensors folders; registered in the MLflow model registry."""
    saved = []
    for name, weights in soups.items():
        model = souper.model(weights)
        path = save_pretrained_safetensors(model, souper.tokenizer, models_dir / name)
        atomic.write_text(path / "soup_weights.json", json.dumps(weights, indent=2))
        if cfg.register_models:
            tracking.register_model_dir(path, name, tags={
                "soup_weights": json.dumps(weights), "merge_method": cfg.merge_method})
        saved.append(name)
    return saved
