"""Merge throughput: materializing an exact LoRA soup against the machine's copy bandwidth.

Materializing ``base + Σ wᵢ·sᵢ·ΔWᵢ`` (for the serving cache and the soups job) reads the base once
and writes the soup once, plus a rank-(Σ rᵢ) product per targeted weight: it should run near the
speed of copying the base. This bench builds a GPT-2 base and k random LoRA adapters in memory
(nothing downloaded), checks the soup against peft (each adapter merged with ``merge_adapter``,
weighted sum of the materialized policies) and times, on the same weights, in one run:

* ``copy: clone``             ``base_tensor.clone()`` of every base tensor (the brief's copy bandwidth)
* ``copy: copy_ into buffer`` ``dst.copy_(src)`` into preallocated tensors (no page faults)
* ``exact_lora fresh``        ``merge_lora_exact``: allocates its output (as ``merge(...)`` does)
* ``exact_lora into buffer``  ``merge_lora_exact(out=...)`` into a reused model (the serving cache path)
* ``peft_linear``             peft ``add_weighted_adapter("linear")``: a new (non-exact) adapter, not
                              materialized; the cheapest peft operation, for scale only

"MiB read" = base parameter bytes (tied weights once) + adapter bytes. Ratios are against the
copy bandwidth of the same run. Run from the repo root:
``python bench/merge_throughput.py --k 3 --n-embd 768 --n-layer 12 --vocab 50257 --rank 16``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model

from raypref.models.merge import LoraAdapter, merge_lora_exact

TARGETS = ["c_attn", "c_proj", "c_fc"]


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build(args):
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


@torch.no_grad()
def peft_soup(peft_model, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """Σ wᵢ · (policy i materialized by peft's ``merge_adapter``), accumulated key by key."""
    acc: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        peft_model.set_adapter(name)
        peft_model.merge_adapter([name])
        for k, v in peft_model.get_base_model().state_dict().items():
            if ".lora_" in k:
                continue
            k = k.replace(".base_layer", "")
            if k in acc:
                acc[k].add_(v, alpha=w)
            else:
                acc[k] = v * w
        peft_model.unmerge_adapter()
    return acc


def peft_linear(peft_model, weights: dict[str, float]) -> Callable[[], object]:
    def run():
        peft_model.add_weighted_adapter(list(weights), list(weights.values()), "soup", combination_type="linear")
        peft_model.delete_adapter("soup")  # same starting state for the next repeat
    return run


def time_medians(fns: list[Callable[[], object]], repeats: int) -> tuple[list[float], list[float]]:
    """Median wall seconds and median process CPU seconds of each fn; the fns take turns so
    background load hits them alike (CPU time is the load-robust figure on a shared machine)."""
    for fn in fns:
        fn()  # warm-up (allocator, lazy imports)
    wall: list[list[float]] = [[] for _ in fns]
    cpu: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, w, c in zip(fns, wall, cpu):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            w.append(time.perf_counter() - start)
            c.append(time.process_time() - start_cpu)
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=3, help="number of LoRA policies")
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default); 1 keeps timings steady on a shared machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, peft_model, adapters, weights = build(args)
    base_state = base.state_dict()  # the module's own tensors: ties visible
    unique = list({t.data_ptr(): t for t in base_state.values()}.values())
    base_bytes, adapter_bytes = nbytes(unique), sum(nbytes(a.tensors.values()) for a in adapters.values())

    # Exactness first: the soup must equal the weighted sum of peft's materialized policies.
    expected = peft_soup(peft_model, weights)
    got = merge_lora_exact(base, adapters, weights)
    err = max((got[k] - expected[k]).abs().max().item() for k in expected)
    moved = max((got[k] - base_state[k]).abs().max().item() for k in expected)
    assert err < 1e-5 < moved, f"exact soup differs from peft's materialized soup by {err:.2e}"
    del expected, got

    target = copy.deepcopy(base)  # a cache slot: its parameters are the output buffer
    buffers = [torch.empty_like(t) for t in unique]
    cases = [
        ("copy: clone", lambda: [t.clone() for t in unique], base_bytes),
        ("copy: copy_ into buffer", lambda: [b.copy_(t) for b, t in zip(buffers, unique)], base_bytes),
        ("exact_lora fresh", lambda: merge_lora_exact(base, adapters, weights), base_bytes + adapter_bytes),
        ("exact_lora into buffer", lambda: merge_lora_exact(base, adapters, weights, out=target.state_dict()),
         base_bytes + adapter_bytes),
        ("peft_linear (not exact)", peft_linear(peft_model, weights), adapter_bytes),
    ]
    n_params = sum(p.numel() for p in base.parameters())
    print(f"base: GPT-2 {args.n_layer}x{args.n_embd}, vocab {args.vocab}: {n_params / 1e6:.2f} M params "
          f"({base_bytes / 2**20:.1f} MiB); k={args.k} LoRA r{args.rank} on {TARGETS}: "
          f"{adapter_bytes / 2**20:.2f} MiB in all; torch threads {torch.get_num_threads()}; "
          f"median of {args.repeats}")
    print(f"check: max |exact_lora - Σ w·peft merge_adapter| = {err:.2e} (asserted < 1e-5; soup moved "
          f"the base by up to {moved:.2e})")
    seconds, cpu_seconds = time_medians([fn for _, fn, _ in cases], args.repeats)
    for clock, secs in (("wall", seconds), ("CPU", cpu_seconds)):
        rate = {name: read / s for (name, _, read), s in zip(cases, secs)}
        clone_bw, copy_bw = rate["copy: clone"], rate["copy: copy_ into buffer"]
        print(f"{clock + ' time':<26}{'median s':>10}{'MiB read':>10}{'GB/s':>8}{'/ clone bw':>12}{'/ copy_ bw':>12}")
        for (name, _, read), s in zip(cases, secs):
            print(f"{name:<26}{s:>10.4f}{read / 2**20:>10.1f}{rate[name] / 1e9:>8.2f}"
                  f"{rate[name] / clone_bw:>12.2f}{rate[name] / copy_bw:>12.2f}")
        best = max(rate["exact_lora fresh"], rate["exact_lora into buffer"])
        print(f"{clock}: exact soup reads at {best / clone_bw:.2f}x the clone bandwidth ({clone_bw / 1e9:.2f} GB/s) "
              f"and {best / copy_bw:.2f}x the copy-into-buffer bandwidth ({copy_bw / 1e9:.2f} GB/s) of this run")
    # The low-rank products alone (2 * rows * cols * Σ ranks FLOPs per targeted weight), into one
    # cache-sized scratch block so that no memory traffic is timed: the compute the merge cannot skip.
    products = low_rank_products(base, adapters, weights)
    (product_s,), _ = time_medians([products], args.repeats)
    flops = sum(2 * x.shape[0] * x.shape[1] * y.shape[1] for x, y in products.factors)
    names = [name for name, _, _ in cases]
    copy_s, into_s = seconds[names.index("copy: copy_ into buffer")], seconds[names.index("exact_lora into buffer")]
    print(f"low-rank products alone: {flops / 1e9:.2f} GFLOP in {product_s:.4f} s ({flops / product_s / 1e9:.1f} GFLOP/s)."
          f" A merge that copies the base and adds the products needs at least copy + products = "
          f"{copy_s:.4f} + {product_s:.4f} = {copy_s + product_s:.4f} s on this core; exact_lora into buffer took "
          f"{into_s:.4f} s (wall, this run)")


def low_rank_products(base, adapters, weights) -> Callable[[], object]:
    """A callable computing every targeted weight's concatenated product X @ Y, 128 rows at a time
    into one reused block (as the merge does), with ``.factors`` listing the (X, Y) pairs."""
    from raypref.models.merge import soup_factors

    _, factors = soup_factors(base, adapters)
    per_key: dict[str, list] = {}
    for name, keyed in factors.items():
        for key, f in keyed.items():
            per_key.setdefault(key, []).append((f.X.float() * weights[name] * f.scaling, f.Y.float()))
    pairs = [(torch.cat([x for x, _ in t], 1), torch.cat([y for _, y in t], 0)) for t in per_key.values()]
    scratch = torch.empty(128 * max(y.shape[1] for _, y in pairs))

    def run():
        for x, y in pairs:
            for start in range(0, x.shape[0], 128):
                rows = x[start:start + 128]
                torch.mm(rows, y, out=scratch[: rows.shape[0] * y.shape[1]].view(rows.shape[0], y.shape[1]))
    run.factors = pairs
    return run

if __name__ == "__main__":
    main()
