"""Per-request LoRA soups without merging: each batch row gets its own weight vector.

For a LoRA-targeted module with base weight W and adapters i = 1..k, the soup model with weights
w computes ``base(x) + Σᵢ wᵢ · sᵢ · ΔWᵢ(x)``, where ``ΔWᵢ(x)`` is the low-rank product applied to
the activations (never the (out × in) matrix). ``SoupForward`` adds that term with a forward hook
on every targeted module (and on every module tied to a targeted weight, such as GPT-2's
``lm_head``, so the model equals the merged one), with the weights as a (batch, k) tensor: rows
of one batch may ask for different soups. All adapters of a module go through two matmuls over
their concatenated ranks, whatever k is.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch

from raypref.models.lora import LoraAdapter, ModuleFactors, adapter_factors, module_kinds


class _ModuleSoup:
    """The k adapters of one module as one concatenated low-rank map ``x -> (x·L ⊙ scale) U``."""

    def __init__(self, parts: list[tuple[int, ModuleFactors]], kind: str):
        self.kind = kind
        X = torch.cat([f.X.float() for _, f in parts], dim=1)  # (rows, Σr)
        Y = torch.cat([f.Y.float() for _, f in parts], dim=0)  # (Σr, cols)
        # linear: y = x Wᵀ, ΔW = X Y -> x Yᵀ Xᵀ; conv1d: y = x W -> x X Y; embedding: y = W[ids] -> X[ids] Y
        self.lower = (Y.T if kind == "linear" else X).contiguous()
        self.upper = (X.T if kind == "linear" else Y).contiguous()
        # which adapter and scaling each of the Σr columns belongs to; modules with the same
        # layout share one per-batch scale tensor
        self.layout = tuple((i, f.X.shape[1], f.scaling) for i, f in parts)

    def prepare(self, col_scale: torch.Tensor, budget_bytes: int) -> None:
        """Per request batch (not per token): fold each row's column scales into its own copy of
        the up-projection, (batch, Σr, out), when that fits ``budget_bytes``; then every decoding
        step costs two kernels per module (a matmul and one batched multiply-add)."""
        self._col_scale = col_scale
        size = col_scale.shape[0] * self.upper.numel() * 4
        self._upper_rows = col_scale[:, :, None] * self.upper if size <= budget_bytes else None

    def add_delta(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``output + Σᵢ wᵢ sᵢ ΔWᵢ(x)``, row by row with the weights given to ``prepare``."""
        batch = x.shape[0]
        if self.kind == "embedding":
            low = torch.nn.functional.embedding(x.reshape(batch, -1), self.lower)
        else:
            low = x.reshape(batch, -1, x.shape[-1]).float() @ self.lower
        out = output.reshape(batch, -1, output.shape[-1]).float()
        if self._upper_rows is not None:
            return torch.baddbmm(out, low, self._upper_rows).to(output.dtype).view(output.shape)
        low = low * self._col_scale[:, None, :]
        return (out + low @ self.upper).to(output.dtype).view(output.shape)


def _column_scales(layout: tuple, soup_weights: torch.Tensor) -> torch.Tensor:
    """(batch, Σr): adapter i's columns get wᵢ · scalingᵢ."""
    return torch.cat([soup_weights[:, i:i + 1].expand(-1, r) * scaling for i, r, scaling in layout], dim=1)


class SoupForward:
    """Hooks ``adapters`` onto ``model`` (a plain base causal LM, modified in place: hooks only).

    Run a forward inside ``with soup.weights(w):`` where ``w`` is a (batch, k) tensor ordered
    like ``names``; outside that block the model is the bare base.
    """

    def __init__(self, model: torch.nn.Module, adapters: Mapping[str, LoraAdapter],
                 fold_budget_bytes: int = 16 << 20):
        self.model = model.eval()
        self.fold_budget_bytes = fold_budget_bytes  # per module: per-row up-projections up to this size
        self.names = list(adapters)
        state, kinds = model.state_dict(), module_kinds(model)
        per_key: dict[str, list[tuple[int, ModuleFactors]]] = {}
        for i, (name, adapter) in enumerate(adapters.items()):
            for key, f in adapter_factors(adapter, name, state, kinds).items():
                per_key.setdefault(key, []).append((i, f))
        # every module whose weight is (or is tied to) a targeted weight gets the update
        by_storage = {state[k].data_ptr(): parts for k, parts in per_key.items()}
        self._soups: dict[str, _ModuleSoup] = {}
        self._hooks = []
        for mod_name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if mod_name not in kinds or weight is None or weight.data_ptr() not in by_storage:
                continue
            soup = _ModuleSoup(by_storage[weight.data_ptr()], kinds[mod_name])
            self._soups[mod_name] = soup
            self._hooks.append(module.register_forward_hook(self._hook(soup)))
        if not self._soups:
            raise ValueError("no adapter targets a module of the model")
        self._current: torch.Tensor | None = None

    @property
    def hooked_modules(self) -> list[str]:
        return list(self._soups)

    def _hook(self, soup: _ModuleSoup):
        def hook(module, args, output):
            if self._current is None:
                return output
            x = args[0]
            if x.shape[0] != self._current.shape[0]:
                raise RuntimeError(f"soup weights for {self._current.shape[0]} rows, batch of {x.shape[0]}")
            return soup.add_delta(x, output)
        return hook

    @contextlib.contextmanager
    def weights(self, soup_weights: torch.Tensor):
        if soup_weights.dim() != 2 or soup_weights.shape[1] != len(self.names):
            raise ValueError(f"soup weights must be (batch, {len(self.names)}), got {tuple(soup_weights.shape)}")
        self._current = soup_weights.float()
        scales = {s.layout: _column_scales(s.layout, self._current) for s in self._soups.values()}
        for soup in self._soups.values():
            soup.prepare(scales[soup.layout], self.fold_budget_bytes)
        try:
            yield self.model
        finally:
            self._current = None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


@torch.no_grad()
def decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           max_new_tokens: list[int], temperatures: list[float], seeds: list[int],
           eos_token_id: int, pad_token_id: int) -> list[list[int]]:
    """Left-padded batch decoding with a KV cache; per row its own length limit, temperature
    (0 = greedy) and seeded sampler, so a row's tokens do not depend on the rest of the batch.
    Each row's ids end at its eos (included) or at its limit."""
    batch = input_ids.shape[0]
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1)
    next_pos = position_ids[:, -1:] + 1
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [m <= 0 for m in max_new_tokens]
    for _ in range(max(max_new_tokens)):
        logits = out.logits[:, -1, :].float()
        chosen = logits.argmax(dim=-1)
        for b in range(batch):
            if done[b]:
                continue
            if temperatures[b] > 0:
                probs = torch.softmax(logits[b] / temperatures[b], dim=-1)
                chosen[b] = torch.multinomial(probs, 1, generator=gens[b])[0]
            tokens[b].append(int(chosen[b]))
            done[b] = tokens[b][-1] == eos_token_id or len(tokens[b]) >= max_new_tokens[b]
        if all(done):
            break
        chosen[torch.tensor(done)] = pad_token_id
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=attention_mask, position_ids=next_pos,
                    cache=out.cache, use_cache=True)
        next_pos = next_pos + 1
    return tokens
