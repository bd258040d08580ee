"""The Ray instance a raypref process starts, pinned to its own address, and a watch that says
why a run waits for resources.

Ray's state API (Ray Train's PlacementGroupCleaner, `ray.util.state`) finds the cluster by
looking it up: `RAY_ADDRESS`, else "the" local instance; with a second local Ray on the
machine that lookup fails ("Found multiple active Ray instances"), the cleaner never frees the
CPUs of a trial ASHA stopped, and the next trial waits forever. `init` starts the local
instance on a GCS port it chooses and gives every process of the job (driver, actors, Train
workers) `RAY_ADDRESS` naming it, so nothing has to look it up.

`watch_resources` runs beside a blocking call in the driver: when a placement group (a Tune
trial or a Ray Train worker group) waits longer than `RAYPREF_RESOURCE_WAIT_WARN_S` it prints
what waits and what holds the cluster's resources; past `RAYPREF_RESOURCE_WAIT_LIMIT_S` it
stops the call with ResourceWaitTimeout naming both.
"""
from __future__ import annotations

import _thread
import contextlib
import os
import socket
import threading
import time
from typing import Iterator

WARN_ENV, LIMIT_ENV = "RAYPREF_RESOURCE_WAIT_WARN_S", "RAYPREF_RESOURCE_WAIT_LIMIT_S"
DEFAULT_WARN_S, DEFAULT_LIMIT_S = 120.0, 1800.0
_pinned: dict[str, str | None] = {}  # the environment init changed, to restore on shutdown


class ResourceWaitTimeout(RuntimeError):
    """Something waited for Ray resources past the limit."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(**kwargs) -> None:
    """ray.init(**kwargs) once per process. Joining a cluster (an ``address`` argument or
    RAY_ADDRESS) keeps that address; a local instance is started on 127.0.0.1 with a GCS port
    chosen here and RAY_ADDRESS set for the driver and, through the job's runtime_env, for
    every worker process."""
    import ray

    if ray.is_initialized():
        return
    if kwargs.get("address") or os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
        return
    port = _free_port()
    address = f"127.0.0.1:{port}"
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_ADDRESS": address}
    previous_port = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the head node it starts
    try:
        ray.init(_node_ip_address="127.0.0.1", runtime_env=runtime_env, **kwargs)
    finally:
        _restore_env("RAY_GCS_SERVER_PORT", previous_port)
    _pinned.setdefault("RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))
    os.environ["RAY_ADDRESS"] = address


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def shutdown() -> None:
    """ray.shutdown, and forget the address init pinned (a later init starts a new instance)."""
    import ray

    ray.shutdown()
    for key, value in _pinned.items():
        _restore_env(key, value)
    _pinned.clear()


# ---------------------------------------------------------------- waiting for resources

def _describe(pg: dict) -> str:
    bundles = pg.get("bundles") or {}
    total: dict[str, float] = {}
    for bundle in bundles.values():
        for kind, amount in bundle.items():
            if not kind.startswith(("node:", "bundle_group")):
                total[kind] = total.get(kind, 0.0) + amount
    name = pg.get("name") or pg.get("placement_group_id", "?")[:12]
    return f"{name} ({', '.join(f'{k} {v:g}' for k, v in sorted(total.items())) or 'nothing'})"


def resource_report(waiting: list[dict], waited_s: float) -> str:
    """What waits, what the cluster has free, and what holds it (placement groups in place)."""
    import ray
    from ray.util import placement_group_table

    table = placement_group_table().values()
    holders = [_describe(pg) for pg in table if pg.get("state") == "CREATED"]
    free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
    total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    return (f"{'; '.join(_describe(pg) for pg in waiting)} waited {waited_s:.0f} s for resources; "
            f"cluster {total}, free {free}; held by {', '.join(holders) or 'no placement group'}")


@contextlib.contextmanager
def watch_resources(warn_after_s: float | None = None, limit_s: float | None = None,
                    poll_s: float = 2.0) -> Iterator[None]:
    """Watch the cluster's placement groups while the body runs (in the main thread of the
    driver): print a report when one waits past warn_after_s (again every warn_after_s), and
    interrupt the body with ResourceWaitTimeout when one waits past limit_s (0 = no limit)."""
    warn = float(os.environ.get(WARN_ENV, DEFAULT_WARN_S)) if warn_after_s is None else warn_after_s
    limit = float(os.environ.get(LIMIT_ENV, DEFAULT_LIMIT_S)) if limit_s is None else limit_s
    if threading.current_thread() is not threading.main_thread():
        yield  # inside an actor (a Tune trial): the driver's watch covers it
        return
    stop, failure = threading.Event(), []
    thread = threading.Thread(target=_watch, args=(warn, limit, poll_s, stop, failure),
                              name="raypref-resource-watch", daemon=True)
    thread.start()
    try:
        yield
    except KeyboardInterrupt:
        if failure:
            raise ResourceWaitTimeout(failure[0]) from None
        raise
    finally:
        stop.set()
        thread.join(timeout=poll_s + 1)
    if failure:  # Tune catches the interrupt itself and ends the sweep gracefully
        raise ResourceWaitTimeout(failure[0])


def _watch(warn: float, limit: float, poll_s: float, stop: threading.Event, failure: list) -> None:
    import ray
    from ray.util import placement_group_table

    first_seen: dict[str, float] = {}
    last_warned = 0.0
    while not stop.wait(poll_s):
        try:
            if not ray.is_initialized():
                continue
            pending = [pg for pg in placement_group_table().values()
                       if pg.get("state") in ("PENDING", "RESCHEDULING")]
        except Exception:  # a cluster shutting down: nothing to report
            continue
        now = time.monotonic()
        ids = {pg["placement_group_id"] for pg in pending}
        first_seen = {i: first_seen.get(i, now) for i in ids}
        if not pending:
            continue
        oldest = max(now - first_seen[i] for i in ids)
        waiting = [pg for pg in pending if now - first_seen[pg["placement_group_id"]] >= warn]
        if limit and oldest >= limit:
            failure.append("stopped: " + resource_report(waiting or pending, oldest)
                           + f" (limit {LIMIT_ENV}={limit:g} s)")
            print(f"[ray] {failure[0]}", flush=True)
            _thread.interrupt_main()
            return
        if waiting and now - last_warned >= warn:
            last_warned = now
            print(f"[ray] waiting: {resource_report(waiting, oldest)}", flush=True)
