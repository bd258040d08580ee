"""The SFT job (``jobs/sft.py``): train (or reuse, by config hash) the warm-start policy, log
its per-step metrics and a few sample generations to MLflow."""
from __future__ import annotations

from pathlib import Path

from raypref import tracking
from raypref.data.world import World
from raypref.models.factory import generate, load_pretrained
from raypref.recipes.sft import SFTConfig, read_metrics, sft_output_dir, train_sft

N_SAMPLES = 3


def run_sft_job(cfg: SFTConfig) -> Path:
    """The model folder (trained now or found in the cache)."""
    cached = sft_output_dir(cfg).exists()
    print(f"[sft] {'cached model at' if cached else 'training into'} {sft_output_dir(cfg)}")
    with tracking.start_run("sft", cfg, cfg.output_dir):
        path = train_sft(cfg)
        tracking.log_step_metrics(read_metrics(path))
        model, tokenizer = load_pretrained(path)
        prompts = World.from_config(cfg).prompts(N_SAMPLES, split="test")
        responses = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_length)
        samples = [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]
        tracking.log_dict({"model_dir": str(path), "cache_hit": cached, "samples": samples},
                          "sft_summary.json")
    for sample in samples:
        print(f"[sft] {sample['prompt']!r} -> {sample['response']!r}")
    print(f"[sft] model: {path}")
    return path
