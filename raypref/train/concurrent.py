"""Train independent runs concurrently, one Ray Train run per name, and survive failures.

Each run is launched from its own lightweight Ray task (it only drives a Ray Train
controller, so it asks for no CPU), so all runs train at the same time, each with the
workers and resources of its own ``RunnerConfig``. A worker crash inside a run is handled by
Ray Train itself (``FailureConfig``: all workers restart from the latest committed
checkpoint). A run that still fails after its retries is reported with its error; the
others carry on.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from raypref.train.runner import RunnerConfig, run


@dataclass
class RunOutcome:
    name: str
    ok: bool
    seconds: float
    result: Any = None          # the runner's RunResult when ok
    error: str | None = None    # short reason when not ok
    details: str = field(default="", repr=False)  # full traceback


def _short(exc: BaseException, max_lines: int = 4, max_chars: int = 500) -> str:
    """Type and first lines of an error: Ray Train's errors put the worker's cause on the
    lines after a generic first one."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {' | '.join(lines[:max_lines])}"[:max_chars]


@ray.remote(num_cpus=0)
def _drive(name: str, spec: Any, cfg: RunnerConfig, restart: bool = False) -> RunOutcome:
    start = time.time()
    try:
        result = run(spec, cfg, restart=restart)
        return RunOutcome(name, True, time.time() - start, result=result)
    except Exception as exc:  # report, don't kill the other runs
        return RunOutcome(name, False, time.time() - start, error=_short(exc),
                          details=traceback.format_exc())


def train_concurrently(jobs: dict[str, tuple[Any, RunnerConfig]],
                       on_done: Callable[[RunOutcome], None] | None = None,
                       on_tick: Callable[[list[str]], None] | None = None,
                       tick_seconds: float = 30.0, restart: bool = False,
                       max_concurrent: int | Callable[[], int] = 0) -> dict[str, RunOutcome]:
    """Run every (spec, runner config), at most ``max_concurrent`` at a time (0: all at once),
    starting the next one in ``jobs`` order as one ends; return outcomes keyed by name.
    ``max_concurrent`` may be a function, asked again before each launch (as a run ends and at
    each tick): an autoscaling cluster that grows while runs wait gets more of them at once.

    A cap matters on a small machine: every Ray Train run brings its own controller and helper
    actors (about 1 GB of processes), whether or not its workers have CPUs to run on yet.
    ``on_done`` is called as each run ends; ``on_tick`` every ``tick_seconds`` with the names
    still running (for progress output); ``restart`` starts existing runs over."""
    def cap() -> int:
        n = max_concurrent() if callable(max_concurrent) else max_concurrent
        if n < 0:
            raise ValueError(f"max_concurrent={n}: must be >= 0 (0 = all at once)")
        return n

    cap()  # a bad cap fails before anything starts
    waiting = list(jobs.items())
    pending: dict = {}

    def launch() -> None:
        limit = cap()
        while waiting and (not limit or len(pending) < limit):
            name, (spec, cfg) = waiting.pop(0)
            pending[_drive.remote(name, spec, cfg, restart)] = name

    launch()
    outcomes: dict[str, RunOutcome] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=tick_seconds)
        if not done and on_tick:
            on_tick(sorted(pending.values()))
        for ref in done:
            name = pending.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as exc:  # the driving task itself died
                outcome = RunOutcome(name, False, 0.0, error=f"{type(exc).__name__}: {exc}"[:500])
            outcomes[name] = outcome
            if on_done:
                on_done(outcome)
        launch()
    return outcomes


def train_sequentially(jobs: dict[str, tuple[Any, RunnerConfig]]) -> dict[str, RunOutcome]:
    """The same runs one after another (the benchmark's baseline)."""
    outcomes = {}
    for name, (spec, cfg) in jobs.items():
        outcomes[name] = ray.get(_drive.remote(name, spec, cfg))
    return outcomes
