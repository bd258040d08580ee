"""GPU check at SmolLM2-135M's shapes, without Ray, DeepSpeed or gguf; prints figures as JSON.

    python scripts/gpu_check.py            # CUDA: bf16, the real shapes
    python scripts/gpu_check.py --tiny     # a few seconds on CPU (what the test suite runs)

The model is built from SmolLM2-135M-Instruct's config with random weights (throughput does
not depend on the values, and the 98 MB GGUF does not travel to a lent GPU machine). Four
checks, each timed: a LoRA DPO step (reference pass with the adapter off, policy pass,
backward, AdamW), the exact soup merge of two LoRA adapters (checked against
base + Σ wᵢ·sᵢ·BᵢAᵢ), the per-request soup forward of serving (checked against the merged
model's logits) and batched decoding with per-request soups. Run it when a device is lent;
it is never part of CI.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the tree

from raypref.algos.dpo import dpo_loss, sequence_logprobs  # noqa: E402
from raypref.models.factory import LoraSettings, add_lora  # noqa: E402
from raypref.models.lora import LoraAdapter  # noqa: E402
from raypref.models.merge import merge_lora_exact  # noqa: E402
from raypref.serve.soup_model import SoupForward, decode  # noqa: E402

# SmolLM2-135M-Instruct (the config.json of the converted GGUF)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY = dict(SMOLLM2, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def build(shape: dict, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in shape.items() if k != "rope_theta"})
    config.rope_parameters = {"rope_type": "default", "rope_theta": shape["rope_theta"]}
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn, repeats: int) -> tuple[float, object]:
        """Seconds per call (median of ``repeats`` after one warm-up call) and the last result."""
        out = fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2], out


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def dpo_check(base, args, clock: Clock, device) -> dict:
    policy = add_lora(copy.deepcopy(base), LoraSettings(r=args.rank, alpha=2 * args.rank))
    policy.train()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, base.config.vocab_size, (2 * args.pairs, args.seq_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = mask.clone()
    labels[:, : args.seq_len // 2] = 0  # the first half is the prompt
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with torch.no_grad(), policy.disable_adapter():
            ref = sequence_logprobs(policy, ids, mask, labels)
        logps = sequence_logprobs(policy, ids, mask, labels)
        loss, _, _ = dpo_loss(logps[: args.pairs], logps[args.pairs:], ref[: args.pairs], ref[args.pairs:], beta=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    seconds, loss = clock.time(step, args.repeats)
    tokens = 2 * args.pairs * args.seq_len
    return {"dpo_step_s": round(seconds, 4), "dpo_pairs_per_s": round(args.pairs / seconds, 2),
            "dpo_tokens_per_s": round(tokens / seconds, 1), "dpo_loss": round(loss, 4),
            "dpo_peak_gib": peak_gib(device), "dpo_shape": f"{args.pairs} pairs x {args.seq_len} tokens"}


def random_adapter(base, rank: int, seed: int) -> LoraAdapter:
    """A LoRA adapter with non-zero B (a trained adapter's shape, random values)."""
    model = add_lora(copy.deepcopy(base), LoraSettings(r=rank, alpha=2 * rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p))
    return LoraAdapter.from_peft_model(model)


def soup_checks(base, args, clock: Clock, device) -> dict:
    adapters = {"a": random_adapter(base, args.rank, 1), "b": random_adapter(base, args.rank, 2)}
    weights = {"a": 0.3, "b": 0.7}
    base_state = base.state_dict()
    merge_s, merged_state = clock.time(lambda: merge_lora_exact(base, adapters, weights), args.repeats)
    # one weight by hand: W + Σ wᵢ·sᵢ·BᵢAᵢ (in float32)
    key = "model.layers.0.self_attn.q_proj.weight"
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    expected = base_state[key].float()
    for name, w in weights.items():
        t, cfg = adapters[name].tensors, adapters[name].config
        delta = t[f"{prefix}.lora_B.weight"].float() @ t[f"{prefix}.lora_A.weight"].float()
        expected = expected + w * (cfg.lora_alpha / cfg.r) * delta.to(expected.device)
    merge_err = float((merged_state[key].float() - expected).abs().max())

    merged = copy.deepcopy(base)
    merged.load_state_dict(merged_state)
    soup = SoupForward(copy.deepcopy(base), adapters)
    rows = torch.tensor([[0.3, 0.7], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]] * max(1, args.gen_batch // 4))
    g = torch.Generator().manual_seed(3)
    prompt_ids = torch.randint(3, base.config.vocab_size, (len(rows), args.prompt_len), generator=g).to(device)
    mask = torch.ones_like(prompt_ids)
    with torch.no_grad():
        reference = merged(input_ids=prompt_ids[:1], attention_mask=mask[:1]).logits.float()

    def forward():
        with torch.no_grad(), soup.weights(rows.to(device)) as model:
            return model(input_ids=prompt_ids, attention_mask=mask).logits.float()

    forward_s, logits = clock.time(forward, args.repeats)
    soup_err = float((logits[0] - reference[0]).abs().max())
    scale = float(reference.abs().max())

    def generate():
        with soup.weights(rows.to(device)) as model:
            return decode(model, prompt_ids, mask, [args.new_tokens] * len(rows), [1.0] * len(rows),
                          list(range(len(rows))), eos_token_id=-1, pad_token_id=base.config.pad_token_id)

    gen_s, tokens = clock.time(generate, max(1, args.repeats // 2))
    n_new = sum(map(len, tokens))
    return {"merge_exact_s": round(merge_s, 4), "merge_max_abs_err": merge_err,
            "soup_forward_s": round(forward_s, 4), "soup_forward_rows": len(rows),
            "soup_vs_merged_max_abs_logit_err": soup_err, "logit_scale": scale,
            "generate_s": round(gen_s, 4), "generate_new_tokens": n_new,
            "generate_tokens_per_s": round(n_new / gen_s, 1),
            "generate_shape": f"{len(rows)} requests x {args.prompt_len} prompt + {args.new_tokens} new tokens",
            "peak_gib": peak_gib(device)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and small batches (CPU smoke test)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.tiny:
        args.pairs, args.seq_len, args.gen_batch, args.prompt_len, args.new_tokens, args.repeats = 2, 32, 4, 8, 8, 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    start = time.perf_counter()
    base = build(TINY if args.tiny else SMOLLM2, dtype, device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
              "parameters_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 1),
              "build_s": round(time.perf_counter() - start, 2)}
    clock = Clock(device)
    report.update(dpo_check(base, args, clock, device))
    report.update(soup_checks(base, args, clock, device))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
