"""Judge a finished soups run's weight sweeps again, on more held-out prompts or samples.

    python scripts/soups_resweep.py <run output_dir> <out.json> --config configs/soups-smollm2.yaml \
        [--eval.n_prompts 72 --eval.samples_per_prompt 4 ...]

The soups job's own sweep (``seed_eval._weight_sweep``, then ``compare.sweep_over_seeds`` with the
pool's reference and the prompt-bootstrap intervals) on the seed-0 adapters the run saved, with
the job's config and generation seeds, so the job's own settings reproduce its sweep numbers; any
``--eval.*`` flag changes only how the sweep is judged (where the config sets
``eval.sweep_n_prompts`` / ``eval.sweep_samples_per_prompt``, those decide the design). Training is not touched: a sweep whose
noise leaves a step unsettled can be judged on more answers without training again.
"""
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from raypref import atomic
from raypref.config import parse_args
from raypref.experiments.soups import evaluate as ev
from raypref.experiments.soups.compare import sweep_over_seeds
from raypref.experiments.soups.config import SoupsConfig
from raypref.experiments.soups.run import base_reference
from raypref.experiments.soups.seed_eval import Souper, _weight_sweep, seed_eval_config
from raypref.experiments.soups.training import training_key
from raypref.recipes.pool import ensure_pool, resolved


def seed0_adapters(run: str | Path, cfg: SoupsConfig) -> dict[str, Path]:
    """The seed-0 adapters of ``run``: those of ``cfg``'s training key, else the only trained
    set there (a run whose key was computed from another pool folder); several: an error."""
    runs = Path(run) / "runs"
    prefs = cfg.preferences
    own = runs / training_key(cfg)
    if all((own / f"{p}-s0" / "final").is_dir() for p in prefs):
        folder = own
    else:
        found = sorted(f for f in runs.glob("*/") if all((f / f"{p}-s0" / "final").is_dir() for p in prefs))
        if len(found) != 1:
            raise ValueError(f"soups_resweep: {runs} has {len(found)} sets of finished seed-0 policies "
                             f"{prefs} ({[f.name for f in found]}), none under this config's "
                             f"{own.name}: run the soups job first, or give the config it ran with")
        folder = found[0]
    return {p: folder / f"{p}-s0" / "final" for p in prefs}


def resweep(run: str | Path, cfg: SoupsConfig, threads: int = 2, log=print) -> dict:
    """The weight sweeps of ``run``'s seed-0 policies judged as ``cfg`` says (the job's own
    functions and seeds): ``sweep`` as the job's ``results.json`` has it, ``per_seed`` with each
    answer's value, ``sft`` (SFT's mean scores), ``seconds``."""
    if cfg.pairs_source != "pool" or not cfg.base_policy:
        raise ValueError("soups_resweep: a run on a pretrained base with pool pairs (base_policy, "
                         f"pairs_source: pool) is needed; this config has base_policy={cfg.base_policy!r}, "
                         f"pairs_source={cfg.pairs_source!r}")
    adapters = seed0_adapters(run, cfg)
    cfg = dataclasses.replace(cfg, eval=ev.for_seeds(cfg.eval, cfg.seeds))
    torch.set_num_threads(threads)  # as the job's evaluation actor: same threads, same numerics
    prefs = cfg.preferences
    souper = Souper(cfg, cfg.base_policy, adapters)
    scorer = ev.make_scorer(cfg.eval, None, prefs, base=cfg.base_policy)
    # the sweep's own design where the config sets one (eval.sweep_*), as the job judges it
    prompts = ev.eval_prompts(ev.sweep_design(cfg.eval), None, cfg.pool.prompts)
    eval_cfg = ev.sweep_design(seed_eval_config(cfg, 0))
    log(f"[resweep] {len(prompts)} prompts x {eval_cfg.samples_per_prompt} samples, "
        f"{len(cfg.eval.weight_grid)} weights per dimension")
    t0 = time.time()

    def generate(model, instruction=None):
        return ev.judged_generations(scorer, model, souper.tokenizer, prompts, eval_cfg, instruction)

    _, sft = generate(souper.base_model)
    per_seed = _weight_sweep(cfg, souper, scorer, generate, prefs, 0, sft)
    sft_quality = ev.mean_scores(sft)["quality"]
    reference = base_reference(cfg, ensure_pool(resolved(cfg.pool), log=log))
    sweep = sweep_over_seeds([per_seed], sft_quality, cfg.eval.quality_margin, reference,
                             n_prompts=len(prompts), n_boot=cfg.eval.n_boot, seed=cfg.eval.seed)
    return {"sft": ev.mean_scores(sft), "sweep": sweep, "per_seed": per_seed,
            "seconds": time.time() - t0, "prompts": len(prompts),
            "samples_per_prompt": eval_cfg.samples_per_prompt}


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    run, out_path = sys.argv[1], Path(sys.argv[2])
    cfg = parse_args(SoupsConfig, sys.argv[3:])
    threads = max(1, min(int(cfg.eval.num_cpus), os.cpu_count() or 1))
    try:
        out = resweep(run, cfg, threads)
    except ValueError as e:
        sys.exit(str(e))
    atomic.write_json(out_path, out, indent=1)
    for dim, row in out["sweep"].items():
        print(dim, {k: v for k, v in row.items() if k != "per_seed"}, flush=True)
    print(f"[resweep] {out['seconds']:.0f} s; written {out_path}")


if __name__ == "__main__":
    main()
