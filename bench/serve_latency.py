"""Serving latency and throughput: per-request LoRA soups vs one pre-merged model, same run.

Builds a soups run on disk (``raypref.serve.demo``: a GPT-2 base + k random LoRA adapters) and
drives the serving engine (``raypref.serve.engine.SoupEngine``, what each Ray Serve replica runs)
directly, without HTTP, so the figures isolate the soup's cost (HTTP and Serve's routing add the
same time to both sides; both go through ``SoupEngine.generate``):

* latency: single requests one after another, each with a fresh weight vector (per-request soup)
  vs the same requests on the model merged once for one vector (held in the engine's cache); p50 / p95;
* throughput: one batch of ``--batch`` requests with all-different weights vs the same batch on
  one merged model; tokens / s.

On a shared machine the wall-clock latency mostly measures the other processes; the CPU time per
request (same single-threaded run) is printed next to it as the load-robust figure.

Targets (issue 11): soup p50 <= 1.15x merged p50; soup batch throughput >= 0.8x merged.
Run: ``python bench/serve_latency.py [--n-layer 4 --n-embd 256 --rank 8 --k 3 --batch 8]``
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time

import torch

from raypref.models.merge import merge_lora_into
from raypref.serve.demo import build_demo_run
from raypref.serve.engine import GenerationRequest, SoupEngine
from raypref.serve.policies import find_policies

PROMPTS = ["tell me about rivers", "how do stars work", "what is a good way to learn about bees",
           "explain clouds to me"]


def random_weights(rng: random.Random, k: int) -> tuple[float, ...]:
    raw = [rng.random() + 1e-3 for _ in range(k)]
    return tuple(x / sum(raw) for x in raw)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=20, help="single requests per side (latency)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=3, help="batches per side (throughput)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)

    names = tuple(f"P{i + 1}A" for i in range(args.k))
    tmp = tempfile.TemporaryDirectory(prefix="serve-bench-")
    run = build_demo_run(tmp.name, preferences=names, n_layer=args.n_layer,
                         n_embd=args.n_embd, r=args.rank, scale=0.05)
    # every other vector: a per-request soup; the fixed one: a pre-merged model in the engine's
    # cache, so both sides run the same engine path (lookup, tokenize, decode, detokenize)
    engine = SoupEngine.from_policies(find_policies(run), cache_size=1, hot_after=1 << 30)
    fixed = random_weights(rng, args.k)
    engine._cache[fixed] = merge_lora_into(copy.deepcopy(engine._base), engine._base, engine._adapters,
                                           dict(zip(engine.names, fixed))).eval()

    def served(reqs, by):
        out = engine.generate(reqs)
        assert all(r.served_by == by for r in out)
        return [r.token_ids for r in out]

    def on_merged(reqs):
        return served(reqs, "cache")

    def on_soup(reqs):
        return served(reqs, "soup")

    def request(w, i):  # max_new_tokens tokens exactly: no early eos (greedy on noise may stop early)
        return GenerationRequest(PROMPTS[i % len(PROMPTS)], w, args.new_tokens, 1.0, i)

    on_soup([request(random_weights(rng, args.k), 0)]), on_merged([request(fixed, 0)])  # warm-up
    lat = {"soup": [], "merged": []}
    cpu = {"soup": [], "merged": []}  # process CPU time: what the request cost, whatever else runs
    for i in range(args.requests):  # alternate so background load hits both alike
        for side, fn, w in (("soup", on_soup, random_weights(rng, args.k)), ("merged", on_merged, fixed)):
            t, c = time.perf_counter(), time.process_time()
            fn([request(w, i)])
            lat[side].append(time.perf_counter() - t)
            cpu[side].append(time.process_time() - c)
    thr = {"soup": [], "merged": []}
    for b in range(args.batches):
        reqs_soup = [request(random_weights(rng, args.k), b * args.batch + j) for j in range(args.batch)]
        reqs_merged = [request(fixed, b * args.batch + j) for j in range(args.batch)]
        for side, fn, reqs in (("soup", on_soup, reqs_soup), ("merged", on_merged, reqs_merged)):
            t = time.perf_counter()
            n = sum(len(ids) for ids in fn(reqs))
            thr[side].append(n / (time.perf_counter() - t))

    n_params = sum(q.numel() for q in engine._base.parameters())
    print(f"base GPT-2 {args.n_layer}x{args.n_embd} ({n_params / 1e6:.2f} M params), k={args.k} LoRA r{args.rank} "
          f"on {len(engine._soup.hooked_modules)} modules; {args.new_tokens} new tokens per request; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'':<28}{'per-request soup':>18}{'pre-merged':>14}{'ratio':>10}")
    for label, q, xs in (("latency p50 (s), batch 1", 0.5, lat), ("latency p95 (s), batch 1", 0.95, lat),
                         ("CPU time p50 (s), batch 1", 0.5, cpu)):
        s, m = percentile(xs["soup"], q), percentile(xs["merged"], q)
        print(f"{label:<28}{s:>18.4f}{m:>14.4f}{s / m:>10.2f}")
    s, m = statistics.median(thr["soup"]), statistics.median(thr["merged"])
    print(f"{f'throughput tok/s, batch {args.batch}':<28}{s:>18.1f}{m:>14.1f}{s / m:>10.2f}")
    print("targets: latency p50 ratio <= 1.15, throughput ratio >= 0.80 "
          "(the soup batch has all-different weights; the merged batch one vector)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
