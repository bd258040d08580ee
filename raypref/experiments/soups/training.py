"""Training every policy of the soups job: one Ray Train run per preference (and P-MORL) per
seed, all at once; a run that already finished with the same fingerprint is reused without
starting Ray Train, so a rerun retrains only what failed."""
from __future__ import annotations

import json
from pathlib import Path

from raypref.recipes import recipe
from raypref.train import storage
from raypref.train.concurrent import RunOutcome, train_concurrently
from raypref.train.faults import FaultInjectingSpec
from raypref.train.fingerprint import FINGERPRINT_FILE, meaning, run_fingerprint
from raypref.train.runner import FINAL_DIR, HISTORY_FILE, RunResult, runner_config

PMORL = "P-MORL"


def run_name(policy: str, seed_index: int) -> str:
    """A run per policy per seed: "P1A-s0", "P-MORL-s2"."""
    return f"{policy}-s{seed_index}"


def training_key(cfg) -> str:
    """Runs live in ``runs/<key>``: re-running the same training config resumes or reuses each
    run (after a code fix too: the runner warns); any change to what is trained starts new runs
    (an old run would refuse a new fingerprint). Evaluation settings and the number of seeds are not part of the key,
    so adding seeds keeps the runs of the first ones."""
    from raypref.config import config_hash, to_dict

    d = to_dict(cfg)
    keep = ("seed", "algo", "preferences", "combinations", "baselines", "base_policy",
            "psoups_files", "sft", "pairs_per_preference")
    if cfg.pairs_source != "world" and not cfg.psoups_files:
        # the pool and its label noise decide the pairs (a world run's key stays as it was)
        keep += ("pairs_source", "pool", "label_noise")
        d["pool"] = {k: v for k, v in d["pool"].items() if k != "dir"}  # where it is kept draws no other pair
    return "train-" + config_hash({**{k: d[k] for k in keep}, "training": to_dict(cfg.policy_training)})


def training_jobs(cfg, sft_dir: str, data: list, runs_dir: str) -> dict[str, tuple]:
    """{run name: (loop spec, runner config)} for every preference (+ P-MORL) of every seed;
    ``data[k]`` is seed k's `SeedData`."""
    build = recipe(cfg.algo).per_preference
    jobs = {}
    for k, seed_data in enumerate(data):
        seed = cfg.seed + k
        sets = dict(seed_data.train)
        if seed_data.pmorl is not None:
            sets[PMORL] = seed_data.pmorl
        for policy, pairs in sets.items():
            name = run_name(policy, k)
            training = cfg.policy_training
            system = seed_data.pmorl_system if policy == PMORL else ""
            spec = build(training, str(sft_dir), policy, pairs, seed, **({"system": system} if system else {}))
            runner_cfg = runner_config(training, cfg.resources, name=name, storage_path=runs_dir,
                                       seed=seed, log_every=max(1, training.steps // 4))
            mode = cfg.inject_failures.get(policy)
            if mode:
                spec = FaultInjectingSpec(spec, mode, marker=str(
                    Path(cfg.output_dir).resolve() / f".injected-{name}"))
            jobs[name] = (spec, runner_cfg)
    return jobs


def completed_result(spec, runner_cfg) -> RunResult | None:
    """The result of a run that already trained to its last step with this fingerprint, read
    from disk (local storage only; a URI is left to the runner's own resume)."""
    root = storage.resolve(runner_cfg.storage_path)
    if storage.is_uri(root):
        return None
    run_dir = Path(root) / runner_cfg.name
    fingerprint_file, final = run_dir / FINGERPRINT_FILE, run_dir / FINAL_DIR
    if not fingerprint_file.exists() or not final.is_dir():
        return None
    now = json.loads(json.dumps(run_fingerprint(spec, runner_cfg), default=str))
    if meaning(json.loads(fingerprint_file.read_text())) != meaning(now):  # code version aside
        return None
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if (p / HISTORY_FILE).exists())
    if not checkpoints:
        return None
    history = json.loads((checkpoints[-1] / HISTORY_FILE).read_text())
    if not history or int(history[-1]["step"]) != runner_cfg.max_steps:
        return None
    return RunResult(final_step=int(history[-1]["step"]), metrics=history, export_path=final,
                     checkpoint_path=checkpoints[-1])


def runs_that_fit(resources, cluster: dict[str, float]) -> int:
    """How many runs of ``resources`` the cluster's CPUs (and GPUs) hold at once (at least 1)."""
    fits = int(cluster.get("CPU", 0.0) // (resources.num_workers * resources.cpus_per_worker))
    if resources.use_gpu:
        fits = min(fits, int(cluster.get("GPU", 0.0) // resources.num_workers))
    return max(1, fits)


def runs_that_fit_now(resources):
    """A function giving ``runs_that_fit`` on the cluster as it is when called: ``train_concurrently``
    asks it before each launch, so runs that wait start as an autoscaling cluster adds workers."""
    import ray

    return lambda: runs_that_fit(resources, ray.cluster_resources())


def train_policies(jobs: dict[str, tuple], restart: bool = False, log=print,
                   on_tick=None, max_concurrent=0) -> tuple[dict[str, RunOutcome], list[str]]:
    """Outcomes of every job and the names of those reused (finished before, not retrained).
    At most ``max_concurrent`` runs at once (0: all; a function: asked before each launch)."""
    outcomes, todo = {}, {}
    for name, (spec, runner_cfg) in jobs.items():
        result = None if restart else completed_result(spec, runner_cfg)
        if result is not None:
            outcomes[name] = RunOutcome(name, True, 0.0, result=result)
        else:
            todo[name] = (spec, runner_cfg)
    reused = sorted(outcomes)
    if reused:
        log(f"    reusing {len(reused)} finished run(s): {', '.join(reused)}")
    if todo:
        outcomes.update(train_concurrently(
            todo, on_done=lambda o: log(f"    {o.name}: {'done' if o.ok else 'FAILED: ' + cause_line(o)} "
                                        f"({o.seconds:.0f} s)"),
            on_tick=on_tick, restart=restart, max_concurrent=max_concurrent))
    return outcomes, reused


def cause_line(outcome: RunOutcome) -> str:
    """The whole final exception of a failed run (type and every line of its message, joined
    with " | "), from the traceback; RunOutcome.error is cut to 500 characters."""
    lines = outcome.details.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if not starts:
        return outcome.error or "unknown error"
    tail = lines[starts[-1] + 1:]
    # frames are indented; the exception starts at the first line that is not
    first = next((i for i, line in enumerate(tail) if line and not line[0].isspace()), None)
    if first is None:
        return outcome.error or "unknown error"
    return " | ".join(line.strip() for line in tail[first:] if line.strip())
