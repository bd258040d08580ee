"""Per-request LoRA soups without merging: each batch row gets its own weight vector.

For a LoRA-targeted module with base weight W and adapters i = 1..k, the soup model with weights
w computes ``base(x) + Σᵢ wᵢ · sᵢ · ΔWᵢ(x)``, where ``ΔWᵢ(x)`` is the low-rank product applied to
the activations (never the (out × in) matrix). ``SoupForward`` wraps the ``forward`` of every
targeted module (and of every module tied to a targeted weight, such as GPT-2's ``lm_head``, so
the model equals the merged one), with the weights as a (batch, k) tensor: rows of one batch may
ask for different soups. All adapters of a module go through their concatenated ranks, whatever
k is: the down-projection ``x @ lower`` rides in the base GEMM (``[W | lower]``, see
``_fuse_lower``), then one batched multiply-add puts ``low @ rows`` into the base output.

Why: decoding is one token per step, so per-module kernel launches and Python overhead are most of
the soup's cost, not FLOPs. Measured on the serving bench's model (GPT-2 4x256, k=3, r=8, batch 1,
CPU time per step vs the merged model): forward hooks with a separate ``x @ lower`` 1.22-1.32x, a
wrapped ``forward`` 1.19x, plus the fused GEMM 1.03x.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Mapping

import torch

from raypref.models.lora import LoraAdapter, ModuleFactors, adapter_factors, module_kinds

# a temperature below this decodes greedily (as 0): logits / T overflows float32 near T = 1e-37
# (softmax then gives NaN and sampling fails), and at T = 1e-3 sampling is already argmax for
# any logit gap above ~0.1
GREEDY_BELOW_TEMPERATURE = 1e-3


class _ModuleSoup:
    """The k adapters of one module as one concatenated low-rank map ``x -> (x·L ⊙ scale) U``."""

    def __init__(self, module: torch.nn.Module, parts: list[tuple[int, ModuleFactors]], kind: str, fuse: bool):
        self.module, self.kind = module, kind
        X = torch.cat([f.X.float() for _, f in parts], dim=1)  # (rows, Σr)
        Y = torch.cat([f.Y.float() for _, f in parts], dim=0)  # (Σr, cols)
        # linear: y = x Wᵀ, ΔW = X Y -> x Yᵀ Xᵀ; conv1d: y = x W -> x X Y; embedding: y = W[ids] -> X[ids] Y
        self.lower = (Y.T if kind == "linear" else X).contiguous()
        self.upper = (X.T if kind == "linear" else Y).contiguous()
        # which adapter and scaling each of the Σr columns belongs to; modules with the same
        # layout share one per-batch scale tensor
        self.layout = tuple((i, f.X.shape[1], f.scaling) for i, f in parts)
        self._fused = None
        if fuse and kind in ("linear", "conv1d") and module.weight.dtype == torch.float32:
            self._fuse_lower()
        self._base_forward = module.forward
        self._rows: torch.Tensor | None = None  # (batch, Σr, out) while a soup is active
        module.forward = self.forward  # an instance attribute: nn.Module calls it, fast path kept

    def _fuse_lower(self) -> None:
        """One GEMM for the base output and the low-rank activations: the weight becomes a view
        into ``[W | lower]`` (no extra copy of W), and an active forward computes
        ``x [W | lower] + [b | 0]`` then adds ``low @ rows`` to the first part. Saves the separate
        ``x @ lower`` kernel, the largest part of the per-token overhead at batch 1."""
        weight, bias, r = self.module.weight, self.module.bias, self.lower.shape[1]
        dim = 1 if self.kind == "conv1d" else 0  # conv1d stores (in, out), linear (out, in)
        width = weight.shape[dim]
        fused = torch.cat([weight.data, self.lower if dim == 1 else self.lower.T], dim=dim).contiguous()
        weight.data = fused[:, :width] if dim == 1 else fused[:width]
        fused_bias = None if bias is None else torch.cat([bias.data, bias.new_zeros(r)])
        self._fused = (fused, fused_bias, width)

    def prepare(self, col_scale: torch.Tensor | None, budget_bytes: int) -> None:
        """Per request batch (not per token): fold each row's column scales into its own copy of
        the up-projection, (batch, Σr, out), when that fits ``budget_bytes`` (then a decoding step
        costs two kernels per module); otherwise scale the low-rank activations each step.
        ``None``: back to the bare base."""
        if col_scale is None:
            self._rows = self._col_scale = None
            return
        batch = col_scale.shape[0]
        if batch * self.upper.numel() * 4 <= budget_bytes:
            self._rows, self._col_scale = col_scale[:, :, None] * self.upper, None
        else:
            self._rows, self._col_scale = self.upper.expand(batch, -1, -1), col_scale[:, None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows
        if rows is None:
            return self._base_forward(x)
        if x.shape[0] != rows.shape[0]:
            raise RuntimeError(f"soup weights for {rows.shape[0]} rows, batch of {x.shape[0]}")
        if self._fused is not None and x.dim() == 3 and x.dtype == torch.float32:
            fused, fused_bias, width = self._fused
            if self.kind == "conv1d":  # as transformers' Conv1D: addmm on the flattened tokens
                h = torch.addmm(fused_bias, x.view(-1, x.shape[-1]), fused).view(*x.shape[:-1], -1)
            else:
                h = torch.nn.functional.linear(x, fused, fused_bias)
            low = h[..., width:]
            if self._col_scale is not None:
                low = low * self._col_scale
            return torch.baddbmm(h[..., :width], low, rows)
        output = self._base_forward(x)
        if self.kind == "embedding":
            low = torch.nn.functional.embedding(x, self.lower)
        else:
            low = (x if x.dtype == torch.float32 else x.float()) @ self.lower
        if self._col_scale is not None:
            low = low * self._col_scale
        if output.dim() == 3 and output.dtype == torch.float32:  # (batch, tokens, out): the decoding case
            return torch.baddbmm(output, low, rows)
        batch = x.shape[0]
        out = torch.baddbmm(output.reshape(batch, -1, output.shape[-1]).float(),
                            low.reshape(batch, -1, low.shape[-1]), rows)
        return out.to(output.dtype).view(output.shape)

    def remove(self) -> None:
        del self.module.forward  # the class's forward again
        if self._fused is not None:  # the weight back in a tensor of its own
            self.module.weight.data = self.module.weight.data.contiguous()


def _column_scales(layout: tuple, soup_weights: torch.Tensor) -> torch.Tensor:
    """(batch, Σr): adapter i's columns get wᵢ · scalingᵢ."""
    return torch.cat([soup_weights[:, i:i + 1].expand(-1, r) * scaling for i, r, scaling in layout], dim=1)


class SoupForward:
    """Wraps ``adapters`` around ``model`` (a plain base causal LM, modified in place: the targeted
    modules' ``forward`` only; ``remove`` undoes it).

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
        targeted = [(n, m) for n, m in model.named_modules()
                    if n in kinds and getattr(m, "weight", None) is not None and m.weight.data_ptr() in by_storage]
        users = Counter(m.weight.data_ptr() for _, m in targeted)
        # a weight shared by several modules (ties) keeps its own tensor: no fused GEMM for them
        self._soups = {n: _ModuleSoup(m, by_storage[m.weight.data_ptr()], kinds[n], fuse=users[m.weight.data_ptr()] == 1)
                       for n, m in targeted}
        if not self._soups:
            raise ValueError("no adapter targets a module of the model")

    @property
    def hooked_modules(self) -> list[str]:
        return list(self._soups)

    @contextlib.contextmanager
    def weights(self, soup_weights: torch.Tensor):
        if soup_weights.dim() != 2 or soup_weights.shape[1] != len(self.names):
            raise ValueError(f"soup weights must be (batch, {len(self.names)}), got {tuple(soup_weights.shape)}")
        w = soup_weights.float()
        scales = {s.layout: _column_scales(s.layout, w) for s in self._soups.values()}
        for soup in self._soups.values():
            soup.prepare(scales[soup.layout], self.fold_budget_bytes)
        try:
            yield self.model
        finally:
            for soup in self._soups.values():
                soup.prepare(None, 0)

    def remove(self) -> None:
        for soup in self._soups.values():
            soup.remove()
        self._soups.clear()


@torch.no_grad()
def decode(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           max_new_tokens: list[int], temperatures: list[float], seeds: list[int],
           eos_token_id: int, pad_token_id: int) -> list[list[int]]:
    """Left-padded batch decoding with a KV cache; per row its own length limit, temperature
    (0, or below ``GREEDY_BELOW_TEMPERATURE``: greedy) and seeded sampler, so a row's tokens do not depend on the rest of the batch.
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
            if temperatures[b] >= GREEDY_BELOW_TEMPERATURE:
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
