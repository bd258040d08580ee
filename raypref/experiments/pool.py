"""The pool job (``jobs/pool.py``): generate, judge and summarize a shared candidate pool of real
text (recipes/pool.py) once, before the jobs that read it; long on CPU, so run it outside the
heavy-run lock (e.g. ``nice -n 5 python jobs/pool.py --config configs/reward-compare-smollm2.yaml``).
An interrupted run resumes from its last finished batch with the same command."""
from __future__ import annotations

import argparse
import typing

from raypref import atomic
from raypref.config import from_dict, load_yaml, value_from_cli
from raypref.recipes.pool import Pool, PoolConfig, ensure_pool, summary


def main(argv: list[str] | None = None) -> Pool:
    """Generate and judge a pool: ``--config file.yaml`` (its ``pool`` or ``data.pool`` section if
    it has one, else the whole file) and ``--field value`` flags over `PoolConfig`'s fields."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="")
    types = typing.get_type_hints(PoolConfig)
    for name in types:
        parser.add_argument(f"--{name}")
    args = parser.parse_args(argv)
    data = {}
    if args.config:
        data = load_yaml(args.config)
        if "pool" in data:  # a job's config with a pool section (the soups job)
            data = data["pool"] or {}
        elif "data" in data:  # a job's config: its data.pool section (or the defaults)
            data = (data["data"] or {}).get("pool", {})
    for name, tp in types.items():
        raw = getattr(args, name)
        if raw is not None:
            data[name] = value_from_cli(tp, raw, f"--{name}")
    cfg = from_dict(PoolConfig, data)
    pool = ensure_pool(cfg)
    atomic.write_json(pool.folder / "summary.json", summary(pool, cfg), indent=1)
    print(f"[pool] {len(pool.candidates)} candidates in {pool.folder} (summary.json: sizes, "
          f"judge correlations)")
    return pool


