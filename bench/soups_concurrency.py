"""Soups training: n per-preference LoRA DPO runs trained concurrently vs one after another.

Personalized Soups trains one policy per preference, each as its own Ray Train run
(``raypref.train.concurrent``). This benchmark, in one process and one ``ray.init``:

1. builds (or reuses from its cache) a *reduced* SFT base (``--sft-steps`` steps on
   ``--sft-corpus`` examples of the simulated world; the tiny 2 x 128 GPT-2 of the default);
2. runs one 2-step warm-up run (cold imports and caches; reported apart);
3. for every n in ``--ns`` (default 1, 2, 4: P1A, P1B, P2A, P2B, ...) times ``train_concurrently``
   and ``train_sequentially`` on the *same* jobs: ``--steps`` optimizer steps of ``--batch`` pairs
   drawn from ``--pairs`` pairs per preference, one worker per run with
   ``cpus_per_worker = --cpus / n`` (so the n runs of a measurement fit the machine together;
   the sequential runs keep the same resources, so only the scheduling differs);
4. splits each run's time into launch (Ray Train controller + worker actor), worker init
   (DeepSpeed import, process group), setup (base + LoRA + ``deepspeed.initialize``), training
   steps, final checkpoint + export and teardown, from timestamps taken on the spec's way to
   the worker and inside it (``TimedSpec``), and prints the tables and the expected ratio on a
   cluster with one worker per preference (an expectation, labelled as such).

Each measurement writes to a fresh ``storage_path`` (nothing resumes); the run folders are
deleted at the end unless ``--keep``. The figures go to ``<out>/results-<time>.json``.

Run: ``.venv/bin/python bench/soups_concurrency.py [--ns 1,2,4 --steps 60 --batch 8 ...]``
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray

from raypref.data.users import psoups_profiles
from raypref.data.world import World
from raypref.recipes.dpo import DPOConfig, DPOSpec
from raypref.recipes.sft import SFTConfig, train_sft
from raypref.train.runner import Resources, RunnerConfig, runner_config
from raypref.train.spec import LoopSpec
from raypref.train.concurrent import RunOutcome, train_concurrently, train_sequentially

PREFERENCES = [p.name for p in psoups_profiles()]  # P1A, P1B, P2A, P2B, P3A, P3B


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- timestamps from the worker

@dataclass
class TimedSpec(LoopSpec):
    """Wraps a spec and records, inside the worker, when the model is built, when the first
    and the last micro-batch loss are computed and when the export ends (written to
    ``stamp_file`` on export; the workers share this machine's disk)."""

    inner: LoopSpec
    stamp_file: str
    stamps: dict = field(default_factory=dict)
    hops: list = field(default_factory=list)  # (pid, time) of every unpickling on the way

    def __setstate__(self, state: dict) -> None:
        # the first unpickling is the argument of the run's driving task (its start), the
        # last one is in the Ray Train worker when the training function gets its config
        self.__dict__.update(state)
        self.hops = [*state.get("hops", []), (os.getpid(), time.time())]

    def roles(self):
        return self.inner.roles()

    def build_model(self, role="policy"):
        import torch

        self.stamps = {"build": time.time(), "torch_threads": torch.get_num_threads(),
                       "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "losses": 0,
                       "hops": self.hops}
        return self.inner.build_model(role)

    def fingerprint(self):
        return self.inner.fingerprint()

    def batches(self, ctx):
        return self.inner.batches(ctx)

    def loss(self, batch, ctx):
        now = time.time()
        self.stamps.setdefault("first_loss", now)
        self.stamps["last_loss"] = now
        self.stamps["losses"] += 1
        return self.inner.loss(batch, ctx)

    def export(self, models, out_dir):
        self.inner.export(models, out_dir)
        self.stamps["exported"] = time.time()
        Path(self.stamp_file).write_text(json.dumps(self.stamps))


@dataclass
class RunTiming:
    """One run's seconds, split by the timestamps taken on its way to and inside the worker."""

    name: str
    total: float          # RunOutcome.seconds: run() inside its driving task, start to end
    launch: float         # Ray Train controller + worker actor up, until the loop gets its config
    worker_init: float    # in the loop: import deepspeed, join the process group
    setup: float          # load the SFT base, add LoRA, deepspeed.initialize, tokenize pairs
    steps: float          # first to last loss call: all steps but the last
    tail: float           # the last step + final checkpoint + export
    teardown: float       # after the export until run() returns (workers, controller stop)
    step_s: float         # seconds per optimizer step
    n_steps: int
    threads: int          # torch threads in the worker
    first_loss_at: float  # absolute time (to see how staggered concurrent runs start)

    @property
    def fixed(self) -> float:
        """Everything that is not a training step."""
        return self.total - self.step_s * self.n_steps


def run_timing(outcome: RunOutcome, stamp_file: Path) -> RunTiming:
    if not outcome.ok:
        raise RuntimeError(f"run {outcome.name} failed: {outcome.error}\n{outcome.details}")
    s = json.loads(stamp_file.read_text())
    (_, started), (_, arrived) = s["hops"][0], s["hops"][-1]
    steps = s["last_loss"] - s["first_loss"]  # the last loss call starts the last step
    return RunTiming(
        outcome.name, outcome.seconds, launch=arrived - started, worker_init=s["build"] - arrived,
        setup=s["first_loss"] - s["build"], steps=steps, tail=s["exported"] - s["last_loss"],
        teardown=started + outcome.seconds - s["exported"], step_s=steps / (s["losses"] - 1),
        n_steps=s["losses"], threads=int(s["torch_threads"]), first_loss_at=s["first_loss"])


def _ship_this_module_by_value() -> None:
    """Ray workers cannot import bench/ (it is no package): pickle TimedSpec by value even
    when this file is imported rather than run (as __main__ it already is)."""
    if __name__ != "__main__":
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])


def build_jobs(names: list[str], sft_dir: Path, pairs: dict, args, storage: Path, steps: int,
               cpus_per_worker: float) -> dict[str, tuple[LoopSpec, RunnerConfig]]:
    """The soups job's per-preference runs (``soups.run.training_jobs`` settings), timed."""
    _ship_this_module_by_value()
    storage.mkdir(parents=True, exist_ok=True)
    jobs = {}
    for name in names:
        training = DPOConfig(steps=steps, micro_batch_size=args.batch, warmup_steps=min(10, steps))
        spec = DPOSpec.from_config(training, str(sft_dir), pairs[name], name=name, seed=args.seed)
        resources = Resources(num_workers=1, cpus_per_worker=cpus_per_worker, zero_stage=0,
                              checkpoint_every=args.checkpoint_every, max_failures=0)
        cfg = runner_config(training, resources, storage_path=str(storage), name=name, seed=args.seed,
                            log_every=max(1, steps))
        jobs[name] = (TimedSpec(spec, str(storage / f"{name}.timing.json")), cfg)
    return jobs


def measure(mode: str, jobs: dict, storage: Path) -> tuple[float, list[RunTiming]]:
    """Wall seconds of training ``jobs`` in ``mode`` and each run's timing."""
    start = time.time()
    if mode == "concurrent":
        outcomes = train_concurrently(jobs, on_done=lambda o: log(
            f"      {o.name} {'done' if o.ok else 'FAILED'} after {o.seconds:.1f} s"))
    else:
        outcomes = train_sequentially(jobs)
    wall = time.time() - start
    return wall, [run_timing(outcomes[n], storage / f"{n}.timing.json") for n in jobs]


# ---------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ns", default="1,2,4", help="numbers of preferences to train (max 6)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per policy")
    p.add_argument("--batch", type=int, default=8, help="pairs per step (micro-batch)")
    p.add_argument("--pairs", type=int, default=64, help="training pairs per preference")
    p.add_argument("--cpus", type=float, default=2.0,
                   help="CPUs shared by the n runs of a measurement: cpus_per_worker = cpus / n")
    p.add_argument("--checkpoint-every", type=int, default=50, help="as the soups job's default")
    p.add_argument("--sft-steps", type=int, default=60, help="reduced SFT base (default job: 300)")
    p.add_argument("--sft-corpus", type=int, default=1000, help="reduced SFT corpus (default: 4000)")
    p.add_argument("--out", default="outputs/bench/soups_concurrency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the runs' folders")
    p.add_argument("--verbose", action="store_true", help="show the workers' logs")
    args = p.parse_args(argv)
    try:
        args.ns = [int(x) for x in args.ns.split(",")]
    except ValueError:
        p.error(f"--ns={args.ns!r}: expected comma-separated integers, e.g. 1,2,4")
    if not args.ns or not all(1 <= n <= len(PREFERENCES) for n in args.ns):
        p.error(f"--ns={args.ns}: each n must be in 1..{len(PREFERENCES)}")
    if args.steps < 2 or args.batch < 1 or args.pairs < args.batch or args.cpus <= 0:
        p.error("need --steps >= 2, --batch >= 1, --pairs >= --batch and --cpus > 0")
    return args


def reduced_sft(args) -> SFTConfig:
    base = SFTConfig()
    training = replace(base.training, steps=args.sft_steps, warmup_steps=min(20, args.sft_steps))
    resources = replace(base.resources, checkpoint_every=args.sft_steps)
    return replace(base, training=training, resources=resources, corpus_size=args.sft_corpus,
                   output_dir=str(Path(args.out) / "sft"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs_root = out / f"runs-{stamp}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=args.verbose,
             configure_logging=False)
    log(f"load average before: {os.getloadavg()[0]:.2f} (other work on the machine skews timings)")
    started = time.time()
    try:
        sft_cfg = reduced_sft(args)
        log(f"SFT base: {sft_cfg.training.steps} steps on {sft_cfg.corpus_size} examples "
            f"(reduced; cached by config hash)")
        t0 = time.time()
        sft_dir = train_sft(sft_cfg)
        log(f"  {sft_dir} ({time.time() - t0:.1f} s)")

        world = World(seed=sft_cfg.world_seed, difficulty=sft_cfg.difficulty)
        names_all = PREFERENCES[: max(args.ns)]
        pairs = {name: world.pairs_for_preference(name, args.pairs, np.random.default_rng([args.seed, i]))
                 for i, name in enumerate(names_all)}

        # a 2-step warm-up run: it pays the cold imports and caches (reported, not compared)
        storage = runs_root / "warm-up"
        wall, (warm_up,) = measure("sequential", build_jobs(names_all[:1], sft_dir, pairs, args,
                                                             storage, 2, args.cpus), storage)
        log(f"2-step warm-up run: {wall:.1f} s, of which fixed {warm_up.fixed:.1f} s")

        rows = []
        for n in args.ns:
            names, cpus = names_all[:n], args.cpus / n
            row = {"n": n, "cpus_per_worker": cpus}
            for mode in ("concurrent", "sequential"):
                log(f"n={n} {mode}: {', '.join(names)} ({args.steps} steps x {args.batch} pairs, "
                    f"cpus_per_worker={cpus:g})")
                storage = runs_root / f"{mode}-n{n}"
                wall, timings = measure(mode, build_jobs(names, sft_dir, pairs, args, storage,
                                                         args.steps, cpus), storage)
                row[mode] = {"wall": wall, "runs": timings}
                log(f"  {wall:.1f} s")
            rows.append(row)
        total = time.time() - started
        log(f"load average after: {os.getloadavg()[0]:.2f}")
    finally:
        ray.shutdown()

    results = report(args, rows, warm_up, total)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"results-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=lambda o: o.__dict__))
    log(f"figures: {path}")
    if not args.keep:
        shutil.rmtree(runs_root, ignore_errors=True)
    return results


# ---------------------------------------------------------------- report

def _mean(values) -> float:
    return statistics.fmean(values) if values else float("nan")


def report(args, rows: list[dict], warm_up: RunTiming, total: float) -> dict:
    """Print the table and the overhead analysis; return everything as a dict."""
    print(f"\nPer policy: {args.steps} steps x {args.batch} pairs (of {args.pairs}), LoRA r8 DPO on "
          f"the tiny 2x128 GPT-2, 1 worker, ZeRO-0, cpus_per_worker = {args.cpus:g}/n, "
          f"checkpoint every {args.checkpoint_every}")
    head = (f"{'n':>2} {'cpu/wkr':>7} {'thr':>3} {'concurrent s':>12} {'sequential s':>12} "
            f"{'seq/conc':>8}  {'per-policy s (concurrent)':<28} {'per-policy s (sequential)'}")
    print(head)
    print("-" * len(head))
    for row in rows:
        conc, seq = row["concurrent"], row["sequential"]
        per = lambda m: " ".join(f"{t.total:.1f}" for t in m["runs"])  # noqa: E731
        print(f"{row['n']:>2} {row['cpus_per_worker']:>7.2f} {conc['runs'][0].threads:>3} "
              f"{conc['wall']:>12.1f} {seq['wall']:>12.1f} {seq['wall'] / conc['wall']:>8.2f}  "
              f"{per(conc):<28} {per(seq)}")
    print("(per-policy s = run() inside its driving task; thr = torch threads per worker)")

    # where a run's time goes; the sequential runs are the uncontended reference
    print("\nWhere a run's time goes (s, mean over the runs of each measurement):")
    parts = ("launch", "worker_init", "setup", "steps", "tail", "teardown", "total")
    print(f"  {'':<16}" + "".join(f"{p:>12}" for p in parts) + f"{'ms/step':>9}{'fixed':>8}")
    overhead = {}
    groups = [("2-step warm-up", [warm_up])]
    groups += [(f"n={row['n']} {mode}", row[mode]["runs"])
               for row in rows for mode in ("sequential", "concurrent")]
    for label, runs in groups:
        mean = {p: _mean([getattr(t, p) for t in runs]) for p in (*parts, "step_s", "fixed")}
        overhead[label] = mean
        print(f"  {label:<16}" + "".join(f"{mean[p]:>12.1f}" for p in parts)
              + f"{mean['step_s'] * 1000:>9.0f}{mean['fixed']:>8.1f}")
    print("  launch = Ray Train controller + worker actor until the loop has its config; "
          "worker_init = import deepspeed + process group;\n  setup = load base + LoRA + "
          "deepspeed.initialize + tokenize; steps = all but the last step; tail = last step + "
          "final checkpoint + export;\n  teardown = until run() returns; "
          "fixed = total - steps x ms/step")
    seq_runs = [t for row in rows for t in row["sequential"]["runs"]]
    fixed, step = _mean([t.fixed for t in seq_runs]), _mean([t.step_s for t in seq_runs])
    print(f"  => sequential runs: fixed {fixed:.1f} s per run vs {step * 1000:.0f} ms per step "
          f"({args.steps} steps = {step * args.steps:.1f} s): the fixed cost is worth "
          f"{fixed / step:.0f} steps")
    single = next((row for row in rows if row["n"] == 1), None)
    if single:  # n = 1 trains the same thing both ways: their gap is the machine's noise
        a, b = single["concurrent"]["wall"], single["sequential"]["wall"]
        gap = abs(a - b) / min(a, b)
        print(f"  noise check: n=1 concurrent vs sequential (identical work) differ by "
              f"{100 * gap:.0f} %" + ("  <- the machine was busy, read the ratios with care"
                                      if gap > 0.15 else ""))

    # what one worker (GPU) per preference would give: only the launch stagger is serial
    stagger = {row["n"]: (max(t.first_loss_at for t in row["concurrent"]["runs"])
                          - min(t.first_loss_at for t in row["concurrent"]["runs"]))
               for row in rows}
    run_s = _mean([t.total for t in seq_runs])
    print("\nEXPECTED on a cluster with one worker (GPU) per preference (an expectation from the "
          "figures above, NOT a measurement):")
    for row in rows:
        n = row["n"]
        expected = n * run_s / (run_s + stagger[n])
        print(f"  n={n}: sequential/concurrent ~ {n} x {run_s:.1f} / ({run_s:.1f} + "
              f"{stagger[n]:.1f} s launch stagger seen here) = {expected:.2f}  (ideal {n})")
    print("  (stagger = spread of the first training step over the concurrent runs; on 2 shared "
          "cores it includes CPU contention, so it is an upper bound)")
    print(f"\nTotal benchmark time: {total:.0f} s")
    return {"args": vars(args), "rows": rows, "warm_up": warm_up, "overhead": overhead,
            "stagger": stagger, "total_s": total}


if __name__ == "__main__":
    main()
