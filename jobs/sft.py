"""SFT warm start on the simulated world (tiny GPT-2 by default, ~2 min on 2 CPU cores).

    python jobs/sft.py [--config sft.yaml] [--resources.num_workers 2] [--training.steps 300] ...

Trains (or reuses: outputs are cached by config hash) the policy, logs per-step metrics and a
few sample generations to MLflow, and prints the model folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref import tracking
from raypref.cli import run_job
from raypref.config import parse_args
from raypref.data.world import World
from raypref.models.factory import generate, load_pretrained
from raypref.recipes.sft import SFTConfig, read_metrics, sft_output_dir, train_sft

N_SAMPLES = 3


def main(argv: list[str] | None = None) -> Path:
    cfg = parse_args(SFTConfig, argv, description=__doc__)
    cached = sft_output_dir(cfg).exists()
    print(f"[sft] {'cached model at' if cached else 'training into'} {sft_output_dir(cfg)}")
    with tracking.start_run("sft", cfg, cfg.output_dir):
        path = train_sft(cfg)
        for metrics in read_metrics(path):
            tracking.log_metrics({k: v for k, v in metrics.items() if k != "step"},
                                 step=int(metrics["step"]))
        model, tokenizer = load_pretrained(path)
        prompts = World(cfg.world_seed, cfg.difficulty).prompts(N_SAMPLES, split="test")
        responses = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_length)
        samples = [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]
        tracking.log_dict({"model_dir": str(path), "cache_hit": cached, "samples": samples},
                          "sft_summary.json")
    for sample in samples:
        print(f"[sft] {sample['prompt']!r} -> {sample['response']!r}")
    print(f"[sft] model: {path}")
    return path


if __name__ == "__main__":
    run_job(main)
