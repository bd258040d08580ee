"""A tiny soups run on disk, laid out as the soups job writes one, for tests, benches and trying
the API: a tiny GPT-2 base (untrained) and LoRA adapters with random, non-zero factors.
Nothing is trained, so the texts are noise; the weights and layout are real."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from raypref.models.factory import LoraSettings, ModelConfig, add_lora, build_policy, build_tokenizer, \
    save_pretrained_safetensors
from raypref.serve.policies import FINAL_DIR, POLICY_INFO_FILE

DEMO_PREFERENCES = ("P1A", "P2A", "P3A")


def build_demo_run(out_dir: str | Path, preferences: tuple[str, ...] = DEMO_PREFERENCES, n_layer: int = 2,
                   n_embd: int = 32, r: int = 4, target_modules: tuple[str, ...] = ("c_attn", "c_proj", "c_fc"),
                   seed: int = 0, scale: float = 0.3, training_key: str = "train-demo") -> Path:
    """Write ``out_dir/sft`` (base) and ``out_dir/runs/<training_key>/<pref>/final`` (adapters); returns
    out_dir. ``seed`` draws the adapters; the base is the same for every seed, so several runs
    (training keys) can share one output folder, as the soups job's runs do."""
    from raypref.data.world import World

    out = Path(out_dir)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=n_layer, n_embd=n_embd, n_head=4, n_positions=128)
    tokenizer = build_tokenizer(cfg, World(seed=0).vocabulary())
    base = build_policy(cfg, tokenizer).eval()
    sft_dir = save_pretrained_safetensors(base, tokenizer, out / "sft")
    for i, name in enumerate(preferences):
        policy = add_lora(build_policy(cfg, tokenizer), LoraSettings(r=r, alpha=2 * r,
                                                                      target_modules=list(target_modules)))
        policy.base_model.model.load_state_dict(base.state_dict(), strict=False)
        gen = torch.Generator().manual_seed(seed * 1000 + i + 1)
        with torch.no_grad():
            for pname, p in policy.named_parameters():
                if "lora_" in pname:  # random A and B: a trained adapter has non-zero B
                    p.copy_(torch.randn(p.shape, generator=gen) * scale)
        final = out / "runs" / training_key / name / FINAL_DIR
        policy.save_pretrained(final, safe_serialization=True)
        (final / POLICY_INFO_FILE).write_text(json.dumps({"preference": name, "sft_dir": str(sft_dir.resolve())}))
    return out
