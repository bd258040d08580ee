"""Personalized Soups merging (P-Soups eq. 5): π* = Σ wᵢ πᵢ with Σ wᵢ = 1.

Every per-preference policy is the same base plus a LoRA update, so the soup of the materialized
policies is exactly ``base + Σ wᵢ · scalingᵢ · ΔWᵢ`` on each LoRA-targeted weight
(``merge_lora_exact``). Averaging A and B separately (what the original P-Soups code and peft's
``linear`` do) is a different model in general; it is kept as ``merge_lora_factors_separately``
for comparison only. TIES / DARE go through peft's ``add_weighted_adapter``. ``MERGE_METHODS`` is
the one registry of method names.

Orientation is decided per module from the base module's type (``raypref.models.lora``): pass the
base as an ``nn.Module`` (preferred) or as its state dict. Tied weights (GPT-2's ``wte`` /
``lm_head``, a Llama with ``tie_word_embeddings``) are recognized by shared storage in the base, so
an adapter on the embedding moves the tied output head too; pass the module's own
``state_dict()`` (or the module), never a clone, or the tie is invisible.

Unless ``out=`` is given, merges return a fresh, fully materialized state dict: no tensor is shared
with the inputs or with another key, so ``safetensors.torch.save_file`` accepts it.
``merge_lora_into`` writes the soup straight into a model's own parameters (ties stay ties).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict

from raypref.models.lora import AdapterError, LoraAdapter, ModuleFactors, adapter_factors, as_adapter, module_kinds

StateDict = dict[str, torch.Tensor]
__all__ = ["LoraAdapter", "MergeError", "MERGE_METHODS", "METHODS", "PEFT_METHODS", "check_method", "merge",
           "merge_full", "merge_lora_exact", "merge_lora_factors_separately", "merge_lora_into",
           "merge_with_peft", "soup_model", "validate_weights"]


class MergeError(ValueError):
    """Inputs that cannot be merged (bad weights, incompatible adapters, unsupported LoRA features)."""


def validate_weights(weights: Mapping[str, float], known: list[str], tol: float = 1e-6) -> dict[str, float]:
    """Check soup weights: known names, finite, non-negative, summing to 1 within ``tol``.

    Names of ``known`` missing from ``weights`` get weight 0. Returns a plain ``{name: float}``.
    """
    if not weights:
        raise MergeError(f"no merge weights given; expected weights for some of {sorted(known)}")
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise MergeError(f"unknown policy names in merge weights: {unknown}; known: {sorted(known)}")
    out = {name: float(w) for name, w in weights.items()}
    bad = {n: w for n, w in out.items() if not math.isfinite(w) or w < 0}
    if bad:
        raise MergeError(f"merge weights must be finite and >= 0, got {bad}")
    total = sum(out.values())
    if abs(total - 1.0) > tol:
        raise MergeError(f"merge weights must sum to 1 (eq. 5), got sum {total!r} for {out}")
    return out


def _state_of(model: "Mapping[str, torch.Tensor] | torch.nn.Module") -> Mapping[str, torch.Tensor]:
    return model.state_dict() if isinstance(model, torch.nn.Module) else model


def _base_state_of(base: "Mapping[str, torch.Tensor] | torch.nn.Module") -> Mapping[str, torch.Tensor]:
    state = _state_of(base)
    wrapped = [k for k in state if ".base_layer." in k or ".lora_" in k]
    if wrapped:
        raise MergeError(f"base state dict contains LoRA-wrapped keys such as {wrapped[0]!r}; pass the plain "
                         "base model (or its state dict), not a PeftModel")
    return state


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _alias_groups(state: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Keys grouped by the tensor they view (tied weights such as GPT-2's wte / lm_head share one)."""
    groups: dict[tuple, list[str]] = {}
    for key, t in state.items():
        groups.setdefault(_storage_key(t), []).append(key)
    return list(groups.values())


def soup_factors(base: "Mapping[str, torch.Tensor] | torch.nn.Module",
                 adapters: Mapping[str, "LoraAdapter | PeftModel | str | Path"],
                 ) -> tuple[Mapping[str, torch.Tensor], dict[str, dict[str, ModuleFactors]]]:
    """(base state, ``{adapter name: {base weight key: ModuleFactors}}``), orientation per module."""
    base_state = _base_state_of(base)
    kinds = module_kinds(base) if isinstance(base, torch.nn.Module) else None
    try:
        return base_state, {n: adapter_factors(as_adapter(a, n), n, base_state, kinds) for n, a in adapters.items()}
    except AdapterError as e:
        raise MergeError(str(e)) from e


# Rows per block of ``out = base + X @ Y``: a block of the output (128 rows of a GPT-2-sized
# weight, 0.4-1.5 MiB) stays in L2 between the copy of the base and the low-rank product that adds
# into it, so the output goes to memory once. 64-128 rows measured fastest on a 1.25-MiB-L2 core;
# bench/merge_throughput.py shows the gain (0.24 s -> 0.20 s at GPT-2-124M scale, one thread).
_ROW_BLOCK = 128


def _addmm_by_row_blocks(src: torch.Tensor, x: torch.Tensor, y: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst = src + x @ y`` in float32, block of rows by block of rows (``dst`` may be ``src``)."""
    if dst.dim() != 2 or not dst.is_contiguous() or dst.device.type != "cpu":
        if dst.data_ptr() == src.data_ptr():
            dst.addmm_(x, y)
        else:
            torch.addmm(src, x, y, out=dst)
        return
    for start in range(0, dst.shape[0], _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        block = dst[rows]
        if dst.data_ptr() != src.data_ptr():
            block.copy_(src[rows])
        block.addmm_(x[rows], y)


def _write_low_rank(base_state: Mapping[str, torch.Tensor], terms: Mapping[str, list[tuple[torch.Tensor, torch.Tensor]]],
                    out: Mapping[str, torch.Tensor]) -> None:
    """``out[key] = base[key] + Σ X @ Y`` for every key, one pass per distinct base tensor.

    The terms of a weight go through one ``addmm`` over the concatenated ranks, written straight
    into ``out``: the base weight is read once and the result written once, which is what bounds
    the merge's speed. Keys that view one tensor (ties) share their terms and are computed once.
    """
    for group in _alias_groups(base_state):
        src = base_state[group[0]]
        group_terms = [t for k in group for t in terms.get(k, ())]
        done: set[tuple] = set()
        for key in group:
            dst = out[key]
            if dst.shape != src.shape:
                raise MergeError(f"out[{key!r}] has shape {tuple(dst.shape)}, the base {tuple(src.shape)}")
            if _storage_key(dst) in done:
                continue  # a tie in the output: already written through another key
            if done:  # untied in the output: copy the first result
                dst.copy_(out[group[0]])
            elif not group_terms:
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
            else:
                x = torch.cat([x for x, _ in group_terms], dim=1) if len(group_terms) > 1 else group_terms[0][0]
                y = torch.cat([y for _, y in group_terms], dim=0) if len(group_terms) > 1 else group_terms[0][1]
                x, y = x.to(src.device), y.to(src.device)
                if src.dtype == torch.float32 and dst.dtype == torch.float32:
                    _addmm_by_row_blocks(src, x.float(), y.float(), dst)
                else:  # low precision: add in float32, round once (as peft's merge does)
                    dst.copy_(torch.addmm(src.float(), x.float(), y.float()))
            done.add(_storage_key(dst))


def merge_lora_exact(
    base: "Mapping[str, torch.Tensor] | torch.nn.Module",
    adapters: Mapping[str, "LoraAdapter | PeftModel | str | Path"],
    weights: Mapping[str, float],
    *,
    out: Mapping[str, torch.Tensor] | None = None,
) -> StateDict:
    """Exact soup of LoRA policies on a shared base: ``base + Σ wᵢ·scalingᵢ·ΔWᵢ`` per targeted weight.

    Adapters may differ in rank, alpha and target modules (an untargeted module contributes 0).
    ``out``: preallocated tensors keyed like the base state dict, written in place and returned
    (e.g. another model's ``state_dict()``); by default, fresh independent tensors.
    """
    weights = validate_weights(weights, list(adapters))
    used = {n: adapters[n] for n, w in weights.items() if w != 0.0}
    base_state, factors = soup_factors(base, used)
    terms: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, per_key in factors.items():
        for key, f in per_key.items():
            terms.setdefault(key, []).append((f.X.float() * (weights[name] * f.scaling), f.Y))
    if out is None:
        out = {k: torch.empty_like(v, memory_format=torch.contiguous_format) for k, v in base_state.items()}
    missing = sorted(set(base_state) - set(out))
    if missing:
        raise MergeError(f"out= lacks base keys such as {missing[:3]}")
    _write_low_rank(base_state, terms, out)
    return dict(out)


def merge_lora_into(model: torch.nn.Module, base: "Mapping[str, torch.Tensor] | torch.nn.Module",
                    adapters: Mapping[str, "LoraAdapter | PeftModel | str | Path"],
                    weights: Mapping[str, float]) -> torch.nn.Module:
    """Write the exact soup into ``model``'s own parameters (same architecture as ``base``; its tied
    weights stay tied). No copy of the model is made: ``model`` is reused as the output buffer."""
    merge_lora_exact(base, adapters, weights, out=model.state_dict(keep_vars=False))
    return model


def merge_lora_factors_separately(
    base: "Mapping[str, torch.Tensor] | torch.nn.Module",
    adapters: Mapping[str, "LoraAdapter | PeftModel | str | Path"],
    weights: Mapping[str, float],
) -> StateDict:
    """For comparison only: ``(Σ wᵢ Bᵢ)(Σ wᵢ Aᵢ)·scaling``, the factor-wise average the original P-Soups
    code used. Not the soup of the policies (cross terms Bᵢ Aⱼ appear). Needs equal targets, ranks, scalings.
    """
    weights = validate_weights(weights, list(adapters))
    base_state, factors = soup_factors(base, {n: adapters[n] for n in weights})
    names = list(factors)
    keys = set(factors[names[0]])
    for n in names[1:]:
        if set(factors[n]) != keys:
            raise MergeError(f"factor-wise merge needs identical LoRA targets; {names[0]!r} and {n!r} differ "
                             f"on {sorted(keys ^ set(factors[n]))}")
    terms = {}
    for key in keys:
        fs = [factors[n][key] for n in names]
        ref = fs[0]
        if any(f.X.shape != ref.X.shape or f.Y.shape != ref.Y.shape or f.scaling != ref.scaling for f in fs):
            raise MergeError(f"factor-wise merge needs equal ranks and scalings at {key!r}")
        x = sum(weights[n] * f.X.float() for n, f in zip(names, fs))
        y = sum(weights[n] * f.Y.float() for n, f in zip(names, fs))
        terms[key] = [(x * ref.scaling, y)]
    out = {k: torch.empty_like(v, memory_format=torch.contiguous_format) for k, v in base_state.items()}
    _write_low_rank(base_state, terms, out)
    return out


def merge_full(
    state_dicts: Mapping[str, "Mapping[str, torch.Tensor] | torch.nn.Module"], weights: Mapping[str, float]
) -> StateDict:
    """Soup of fully fine-tuned policies: ``Σ wᵢ θᵢ`` key by key (non-float buffers must agree)."""
    weights = validate_weights(weights, list(state_dicts))
    states = {n: _state_of(s) for n, s in state_dicts.items()}
    names = list(weights)
    keys = list(states[names[0]])
    for n in names[1:]:
        if set(states[n]) != set(keys):
            raise MergeError(f"state dicts {names[0]!r} and {n!r} have different keys: "
                             f"{sorted(set(keys) ^ set(states[n]))[:5]}")
    out: StateDict = {}
    for key in keys:
        tensors = [states[n][key] for n in names]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise MergeError(f"shape mismatch at {key!r}: {[tuple(t.shape) for t in tensors]}")
        if not tensors[0].is_floating_point():
            if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
                raise MergeError(f"non-float tensor {key!r} differs between policies; cannot average it")
            out[key] = tensors[0].detach().clone()
            continue
        acc = None
        for n, t in zip(names, tensors):
            if weights[n] == 0.0:
                continue
            if acc is None:
                acc = t.detach().float() * weights[n]  # a fresh tensor, never an alias of an input
            else:
                acc.add_(t.detach().float(), alpha=weights[n])
        out[key] = acc.to(tensors[0].dtype)
    return out


def merge_with_peft(
    base_model: torch.nn.Module,
    adapters: Mapping[str, "LoraAdapter | PeftModel | str | Path"],
    weights: Mapping[str, float],
    combination_type: str,
    density: float | None = None,
) -> StateDict:
    """Merge through peft's ``add_weighted_adapter`` (any of its combination types), then materialize.

    ``base_model`` is deep-copied, never modified. Zero-weight adapters are left out.
    """
    weights = {n: w for n, w in validate_weights(weights, list(adapters)).items() if w > 0}
    model = copy.deepcopy(base_model)
    peft_model = None
    for name in weights:
        adapter = as_adapter(adapters[name], name)
        if peft_model is None:
            peft_model = get_peft_model(model, copy.deepcopy(adapter.config), adapter_name=name)
        else:
            peft_model.add_adapter(name, copy.deepcopy(adapter.config))
        result = set_peft_model_state_dict(peft_model, dict(adapter.tensors), adapter_name=name)
        if result.unexpected_keys:
            raise MergeError(f"adapter {name!r} does not fit the base model: {result.unexpected_keys[:3]}")
    peft_model.add_weighted_adapter(list(weights), list(weights.values()), "soup",
                                    combination_type=combination_type, density=density)
    peft_model.set_adapter("soup")
    merged = peft_model.merge_and_unload(adapter_names=["soup"])
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _merge_exact(weights, *, base, adapters, **_):
    return merge_lora_exact(base, adapters, weights)


def _merge_factor_wise(weights, *, base, adapters, **_):
    return merge_lora_factors_separately(base, adapters, weights)


def _merge_full(weights, *, full_models, **_):
    return merge_full(full_models, weights)


def _peft_method(combination_type: str) -> Callable[..., StateDict]:
    def run(weights, *, base, adapters, density, **_):
        return merge_with_peft(base, adapters, weights, combination_type, density)
    return run


# The one table of merge methods: name -> (function, what it needs). Config validation and
# ``merge`` both read it, so a new method is one entry here.
MERGE_METHODS: dict[str, tuple[Callable[..., StateDict], tuple[str, ...]]] = {
    "exact_lora": (_merge_exact, ("base", "adapters")),
    "lora_factors_linear": (_merge_factor_wise, ("base", "adapters")),
    "ties": (_peft_method("ties"), ("base_module", "adapters", "density")),
    "dare_ties": (_peft_method("dare_ties"), ("base_module", "adapters", "density")),
    "dare_linear": (_peft_method("dare_linear"), ("base_module", "adapters", "density")),
    "full": (_merge_full, ("full_models",)),
}
METHODS = tuple(MERGE_METHODS)
PEFT_METHODS = tuple(m for m, (_, needs) in MERGE_METHODS.items() if "density" in needs)


def check_method(method: str, density: float | None = None) -> None:
    """Validate a method name (and its density where it takes one) before anything runs."""
    if method not in MERGE_METHODS:
        raise MergeError(f"unknown merge method {method!r}; expected one of {METHODS}")
    if "density" in MERGE_METHODS[method][1] and (density is None or not 0.0 < density <= 1.0):
        raise MergeError(f"method {method!r} needs density in (0, 1], got {density!r}")


def merge(
    method: str,
    weights: Mapping[str, float],
    *,
    base: "Mapping[str, torch.Tensor] | torch.nn.Module | None" = None,
    adapters: Mapping[str, "LoraAdapter | PeftModel | str | Path"] | None = None,
    full_models: Mapping[str, "Mapping[str, torch.Tensor] | torch.nn.Module"] | None = None,
    density: float | None = None,
) -> StateDict:
    """One entry point for every soup; ``method`` in ``MERGE_METHODS``.

    ``exact_lora`` / ``lora_factors_linear`` need ``base`` (the module, or its own state dict) and
    ``adapters``; ``ties`` / ``dare_ties`` / ``dare_linear`` need ``base`` as an ``nn.Module``,
    ``adapters`` and ``density`` in (0, 1]; ``full`` needs ``full_models``.
    """
    check_method(method, density)
    given = {"base": base is not None, "base_module": isinstance(base, torch.nn.Module),
             "adapters": adapters is not None, "full_models": full_models is not None, "density": True}
    for need in MERGE_METHODS[method][1]:
        if not given[need]:
            if need == "base_module" and base is not None:
                raise MergeError(f"method {method!r} runs through peft and needs base as an nn.Module, "
                                 f"got {type(base).__name__}")
            raise MergeError(f"method {method!r} needs {need.replace('base_module', 'base')}=")
    fn, _ = MERGE_METHODS[method]
    return fn(weights, base=base, adapters=adapters, full_models=full_models, density=density)


def soup_model(method: str, base_model: torch.nn.Module, weights: Mapping[str, float], *,
               adapters: Mapping[str, "LoraAdapter | PeftModel | str | Path"] | None = None,
               full_models: Mapping[str, "Mapping[str, torch.Tensor] | torch.nn.Module"] | None = None,
               density: float | None = None) -> torch.nn.Module:
    """The soup as a ready model: a copy of ``base_model`` holding the merged weights, its ties kept.

    ``base_model`` itself is never modified and is passed to the merge as the module (not a clone of
    its state dict), so tied weights and each module's type are visible to it.
    """
    model = copy.deepcopy(base_model)
    if method == "exact_lora":
        return merge_lora_into(model, base_model, adapters or {}, weights).eval()
    state = merge(method, weights, base=base_model, adapters=adapters, full_models=full_models, density=density)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k, v in model.state_dict().items() if k in missing and any(
        v.data_ptr() == model.state_dict()[o].data_ptr() for o in state if o != k)}
    if set(missing) - tied or unexpected:
        raise MergeError(f"merged state does not fit the model: missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model.eval()
