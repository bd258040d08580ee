"""Merge throughput: raypref's exact LoRA soup and full-model soup vs peft's add_weighted_adapter.

Builds a small GPT-2 base and k LoRA adapters in memory (nothing downloaded), then times, on the
same adapters and weights:

* ``exact_lora``   raypref ``merge_lora_exact``: base + Σ wᵢ BᵢAᵢ sᵢ, full state dict out
* ``full``         raypref ``merge_full`` over the k materialized policies (Σ wᵢ θᵢ)
* ``peft_linear``  peft ``add_weighted_adapter(combination_type="linear")``: a new adapter out
                   (A and B weighted separately; not materialized, not the exact soup)
* ``peft_linear+materialize``  the same, then merged into the base and read out as a state dict

"bytes read" = the parameter bytes each method must consume (base and/or adapters or full models).
Run: ``.venv/bin/python bench/merge_throughput.py [--k 6 --repeats 5 ...]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model

from raypref.models.merge import LoraAdapter, merge_full, merge_lora_exact

TARGETS = ["c_attn", "c_proj", "c_fc"]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build(args) -> tuple[torch.nn.Module, torch.nn.Module, dict[str, LoraAdapter], dict[str, float]]:
    """Base model, a PeftModel holding all k adapters, the adapters, and random soup weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=128, n_embd=args.n_embd, n_layer=args.n_layer,
                     n_head=4, bos_token_id=0, eos_token_id=0)
    base = GPT2LMHeadModel(cfg).eval()
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, fan_in_fan_out=True)
    names = [f"pref{i}" for i in range(args.k)]
    peft_model = get_peft_model(copy.deepcopy(base), copy.deepcopy(lora), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, copy.deepcopy(lora))
    with torch.no_grad():  # trained adapters have non-zero B; random factors stand in for them
        for pname, p in peft_model.named_parameters():
            if "lora_" in pname:
                p.normal_(0.0, 0.02)
    adapters = {n: LoraAdapter.from_peft_model(peft_model, n) for n in names}
    w = torch.distributions.Dirichlet(torch.ones(args.k)).sample()
    weights = {n: float(x) for n, x in zip(names, w / w.sum())}
    weights[names[-1]] = 1.0 - sum(weights[n] for n in names[:-1])  # exact sum 1 in float64
    return base, peft_model, adapters, weights


def materialized_policies(peft_model, names) -> dict[str, dict[str, torch.Tensor]]:
    """Each adapter merged into its own copy of the base (input of the full-model soup)."""
    out = {}
    for name in names:
        peft_model.set_adapter(name)
        peft_model.merge_adapter([name])
        out[name] = {k: v.clone() for k, v in peft_model.get_base_model().state_dict().items()
                     if ".lora_" not in k}
        peft_model.unmerge_adapter()
    return {n: {k.replace(".base_layer", ""): v for k, v in sd.items()} for n, sd in out.items()}


def peft_linear(peft_model, weights: dict[str, float], materialize: bool) -> Callable[[], object]:
    def run():
        peft_model.add_weighted_adapter(list(weights), list(weights.values()), "soup", combination_type="linear")
        result = None
        if materialize:
            peft_model.set_adapter("soup")
            peft_model.merge_adapter(["soup"])
            result = {k: v.clone() for k, v in peft_model.get_base_model().state_dict().items()
                      if ".lora_" not in k}
            peft_model.unmerge_adapter()
        peft_model.delete_adapter("soup")  # same starting state for the next repeat
        return result
    return run


def time_medians(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each fn; the fns take turns so background load hits them alike."""
    for fn in fns:
        fn()  # warm-up (allocator, lazy imports)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=6, help="number of LoRA policies")
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); 1 keeps timings steady on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, peft_model, adapters, weights = build(args)
    base_state = base.state_dict()
    full = materialized_policies(peft_model, list(adapters))
    base_bytes = nbytes({t.data_ptr(): t for t in base_state.values()}.values())  # tied weights once
    adapter_bytes = sum(nbytes(a.tensors.values()) for a in adapters.values())

    # Sanity: the exact soup equals the soup of the materialized policies.
    exact = merge_lora_exact(base_state, adapters, weights)
    soup = merge_full(full, weights)
    err = max((exact[k] - soup[k]).abs().max().item() for k in exact)

    cases = [
        ("exact_lora (raypref)", lambda: merge_lora_exact(base_state, adapters, weights), base_bytes + adapter_bytes),
        ("full (raypref)", lambda: merge_full(full, weights), args.k * base_bytes),
        ("peft_linear", peft_linear(peft_model, weights, materialize=False), adapter_bytes),
        ("peft_linear+materialize", peft_linear(peft_model, weights, materialize=True),
         base_bytes + adapter_bytes),
    ]
    n_params = sum(p.numel() for p in base.parameters())
    print(f"base: GPT-2 {args.n_layer}x{args.n_embd}, vocab {args.vocab}: {n_params / 1e6:.2f} M params "
          f"({base_bytes / 2**20:.1f} MiB); k={args.k} LoRA r{args.rank} on {TARGETS}: "
          f"{adapter_bytes / 2**20:.2f} MiB in all; torch threads {torch.get_num_threads()}; "
          f"median of {args.repeats}")
    print(f"check: max |exact_lora - full soup| = {err:.2e}")
    medians = time_medians([fn for _, fn, _ in cases], args.repeats)
    results = [(name, seconds, read) for (name, _, read), seconds in zip(cases, medians)]
    peft_t = dict((n, t) for n, t, _ in results)
    print(f"{'method':<26}{'median s':>10}{'MiB read':>10}{'MiB/s':>10}{'time / peft_linear':>20}"
          f"{'time / peft+mat':>17}")
    for name, seconds, read in results:
        print(f"{name:<26}{seconds:>10.4f}{read / 2**20:>10.1f}{read / 2**20 / seconds:>10.1f}"
              f"{seconds / peft_t['peft_linear']:>20.2f}{seconds / peft_t['peft_linear+materialize']:>17.2f}")


if __name__ == "__main__":
    main()
