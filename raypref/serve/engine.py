"""The serving core without Ray: per-request soups over a base + k adapters, with an LRU cache
of materialized soups for weight vectors that keep coming back.

A batch is split by weight vector: rows whose weights have a cached merged model run on it
(grouped by vector); all other rows run together on the hooked base (``SoupForward``), each with
its own weights. A weight vector is materialized (``merge_lora_into``, exact) once it has been
asked for ``hot_after`` times; the least recently used merged model is recycled as the buffer.

A group that fails is retried row by row, so one failing request gets its own error
(``GenerationError``) and the others of its batch their results.
"""
from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from raypref.models.factory import load_pretrained, prompt_text
from raypref.models.lora import LoraAdapter
from raypref.models.merge import merge_lora_into
from raypref.serve.policies import SoupPolicies
from raypref.serve.soup_model import SoupForward, decode

WeightKey = tuple[float, ...]
ASKED_LIMIT = 4096  # weight vectors whose request counts are kept (least recently asked dropped)
logger = logging.getLogger(__name__)


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


class GenerationError(RuntimeError):
    """Generation failed for this request alone (returned in its place, not raised for the batch)."""


def model_copies(cache_size: int) -> int:
    """Copies of the base one engine holds: the base, the soup's hooked copy, the merge cache."""
    return 2 + cache_size


def memory_needed(base_dir, adapter_dirs, cache_size: int, runs: int) -> int:
    """Bytes of ``runs`` engines, from the weight files' sizes (float32 weights load at about
    their file size; a half-precision file underestimates by 2x)."""
    from pathlib import Path

    base = sum(f.stat().st_size for f in Path(base_dir).glob("*.safetensors"))
    adapters = sum(f.stat().st_size for d in adapter_dirs for f in Path(d).glob("*.safetensors"))
    return runs * (model_copies(cache_size) * base + adapters)


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
        self._asked: OrderedDict[WeightKey, int] = OrderedDict()  # bounded: ASKED_LIMIT
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
        self._asked[key] = self._asked.get(key, 0) + 1
        self._asked.move_to_end(key)
        if len(self._asked) > ASKED_LIMIT:  # a stream of distinct vectors cannot grow it forever
            self._asked.popitem(last=False)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        return None

    def _promote(self, keys: set[WeightKey]) -> None:
        """Materialize the weight vectors that became hot (after a batch, so no model in use is recycled)."""
        for key in keys:
            if self.cache_size <= 0 or key in self._cache or self._asked.get(key, 0) < self.hot_after:
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

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult | GenerationError]:
        """One result per request, in order; a request whose generation fails gets a
        ``GenerationError`` in its place and the rest of the batch is unaffected."""
        with self._lock:
            groups: dict[object, tuple[torch.nn.Module | None, list[int]]] = {}
            for i, r in enumerate(requests):
                model = self._lookup(r.weights)
                key = r.weights if model is not None else "soup"
                groups.setdefault(key, (model, []))[1].append(i)
            results: list[GenerationResult | GenerationError | None] = [None] * len(requests)
            for model, rows in groups.values():
                try:
                    done = self._generate_group(model, [requests[i] for i in rows])
                except Exception as e:  # one row may be the cause: retry each alone
                    logger.warning("generation failed for a group of %d, retrying row by row: %r", len(rows), e)
                    done = [self._generate_alone(model, requests[i]) for i in rows]
                for i, result in zip(rows, done):
                    results[i] = result
            self._promote({r.weights for r in requests})
            return results  # type: ignore[return-value]

    def _generate_alone(self, model, request: GenerationRequest) -> GenerationResult | GenerationError:
        try:
            return self._generate_group(model, [request])[0]
        except Exception as e:
            logger.exception("generation failed for one request")
            return GenerationError(f"generation failed: {type(e).__name__}")

    def _generate_group(self, model, batch: list[GenerationRequest]) -> list[GenerationResult]:
        if model is None:
            w = torch.tensor([r.weights for r in batch], dtype=torch.float32)
            with self._soup.weights(w) as hooked:
                ids = self._decode(hooked, batch)
        else:
            ids = self._decode(model, batch)
        with self._tokenizer_lock:
            texts = [self.tokenizer.decode(seq, skip_special_tokens=True).strip() for seq in ids]
        return [GenerationResult(text, seq, "soup" if model is None else "cache") for text, seq in zip(texts, ids)]

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
