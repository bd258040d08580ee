"""The serving core without Ray: per-request soups over a base + k adapters, with an LRU cache
of materialized soups for weight vectors that keep coming back.

A batch is split by weight vector: rows whose weights have a cached merged model run on it
(grouped by vector); all other rows run together on the hooked base (``SoupForward``), each with
its own weights. A weight vector is materialized (``merge_lora_into``, exact) once it has been
asked for ``hot_after`` times; the least recently used merged model is recycled as the buffer.
"""
from __future__ import annotations

import copy
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from raypref.models.factory import load_pretrained, prompt_text
from raypref.models.lora import LoraAdapter
from raypref.models.merge import merge_lora_into
from raypref.serve.policies import SoupPolicies
from raypref.serve.soup_model import SoupForward, decode

WeightKey = tuple[float, ...]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    weights: WeightKey  # ordered like SoupEngine.names, validated, summing to 1
    max_new_tokens: int
    temperature: float  # 0 = greedy
    seed: int


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    served_by: str  # "soup" (per-request) or "cache" (materialized merge)


class SoupEngine:
    def __init__(self, base_model: torch.nn.Module, tokenizer, adapters: dict[str, LoraAdapter],
                 cache_size: int = 4, hot_after: int = 3, version: str = ""):
        self.tokenizer = tokenizer
        self.names = list(adapters)
        self.version = version
        self._base = base_model.eval()
        self._adapters = adapters
        self._soup = SoupForward(copy.deepcopy(self._base), adapters)
        self.cache_size, self.hot_after = cache_size, hot_after
        self._cache: OrderedDict[WeightKey, torch.nn.Module] = OrderedDict()
        self._asked: Counter[WeightKey] = Counter()
        self._lock = threading.Lock()  # one batch at a time touches the cache
        # a fast tokenizer keeps its padding settings in shared state that every call resets:
        # prompt_length (request handler) during a batch's padded encode made that batch's rows
        # ragged ("Unable to create tensor", a 500 under load); tokenizer calls take this lock
        self._tokenizer_lock = threading.Lock()
        self.max_positions = int(getattr(base_model.config, "n_positions", 0)
                                 or getattr(base_model.config, "max_position_embeddings", 0) or 1 << 30)

    @classmethod
    def from_policies(cls, policies: SoupPolicies, **kwargs) -> "SoupEngine":
        model, tokenizer = load_pretrained(policies.base_dir)
        adapters = {n: LoraAdapter.from_dir(p) for n, p in policies.adapters.items()}
        return cls(model, tokenizer, adapters, version=policies.version, **kwargs)

    def prompt_length(self, prompt: str) -> int:
        with self._tokenizer_lock:
            return len(self.tokenizer(prompt_text(self.tokenizer, prompt), add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------ cache

    def _lookup(self, key: WeightKey) -> torch.nn.Module | None:
        """The cached merged model for ``key``, if any (counts the request)."""
        self._asked[key] += 1
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        return None

    def _promote(self, keys: set[WeightKey]) -> None:
        """Materialize the weight vectors that became hot (after a batch, so no model in use is recycled)."""
        for key in keys:
            if self.cache_size <= 0 or key in self._cache or self._asked[key] < self.hot_after:
                continue
            if len(self._cache) >= self.cache_size:
                _, buffer = self._cache.popitem(last=False)  # recycle the least recently used
            else:
                buffer = copy.deepcopy(self._base)
            self._cache[key] = merge_lora_into(buffer, self._base, self._adapters,
                                               dict(zip(self.names, key))).eval()

    def cached(self) -> list[WeightKey]:
        return list(self._cache)

    # ------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        with self._lock:
            groups: dict[object, tuple[torch.nn.Module | None, list[int]]] = {}
            for i, r in enumerate(requests):
                model = self._lookup(r.weights)
                key = r.weights if model is not None else "soup"
                groups.setdefault(key, (model, []))[1].append(i)
            results: list[GenerationResult | None] = [None] * len(requests)
            for key, (model, rows) in groups.items():
                batch = [requests[i] for i in rows]
                if model is None:
                    w = torch.tensor([r.weights for r in batch], dtype=torch.float32)
                    with self._soup.weights(w) as hooked:
                        ids = self._decode(hooked, batch)
                else:
                    ids = self._decode(model, batch)
                for i, seq in zip(rows, ids):
                    with self._tokenizer_lock:
                        text = self.tokenizer.decode(seq, skip_special_tokens=True).strip()
                    results[i] = GenerationResult(text, seq, "soup" if model is None else "cache")
            self._promote({r.weights for r in requests})
            return results  # type: ignore[return-value]

    def _decode(self, model, batch: list[GenerationRequest]) -> list[list[int]]:
        tok = self.tokenizer
        with self._tokenizer_lock:
            side, tok.padding_side = tok.padding_side, "left"
            try:
                enc = tok([prompt_text(tok, r.prompt) for r in batch], return_tensors="pt", padding=True,
                          add_special_tokens=False)
            finally:
                tok.padding_side = side
        return decode(model, enc["input_ids"], enc["attention_mask"], [r.max_new_tokens for r in batch],
                      [r.temperature for r in batch], [r.seed for r in batch],
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
