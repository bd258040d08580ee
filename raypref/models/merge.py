"""Personalized Soups merging (seed 002 eq. 5): π* = Σ wᵢ πᵢ with Σ wᵢ = 1.

Every per-preference policy is the same base plus a LoRA update, so the soup of the materialized
policies is exactly ``base + Σ wᵢ · Bᵢ Aᵢ · scalingᵢ`` on each LoRA-targeted weight
(``merge_lora_exact``). Averaging A and B separately (what the original P-Soups code and peft's
``linear`` do) is a different model in general; it is kept as ``merge_lora_factors_separately``
for comparison only. TIES / DARE go through peft's ``add_weighted_adapter``.

All merges return a fresh, fully materialized state dict: no tensor is shared with the inputs or
with another key, so ``safetensors.torch.save_file`` accepts it and ``load_state_dict`` restores it.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

StateDict = dict[str, torch.Tensor]
METHODS = ("exact_lora", "lora_factors_linear", "ties", "dare_ties", "dare_linear", "full")
PEFT_METHODS = ("ties", "dare_ties", "dare_linear")
_PEFT_PREFIX = "base_model.model."
# peft key suffixes -> (factor, is_embedding); embeddings store raw Parameters, linears `.weight`.
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


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


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter as peft saves it: ``tensors`` keyed like ``adapter_model.safetensors``."""

    tensors: Mapping[str, torch.Tensor]
    config: LoraConfig

    @classmethod
    def from_dir(cls, path: str | Path) -> "LoraAdapter":
        """Load an adapter directory written by ``PeftModel.save_pretrained`` (safetensors only)."""
        from safetensors.torch import load_file

        path = Path(path)
        weights_file, config_file = path / "adapter_model.safetensors", path / "adapter_config.json"
        for f in (weights_file, config_file):
            if not f.is_file():
                raise MergeError(f"adapter directory {path} has no {f.name}")
        config = LoraConfig(**{k: v for k, v in json.loads(config_file.read_text()).items() if k != "peft_type"})
        return cls(load_file(str(weights_file)), config)

    @classmethod
    def from_peft_model(cls, model: PeftModel, adapter_name: str = "default") -> "LoraAdapter":
        """Snapshot one adapter of an in-memory ``PeftModel``."""
        if adapter_name not in model.peft_config:
            raise MergeError(f"PeftModel has no adapter {adapter_name!r}; it has {sorted(model.peft_config)}")
        tensors = get_peft_model_state_dict(model, adapter_name=adapter_name)
        return cls({k: v.detach().clone() for k, v in tensors.items()}, model.peft_config[adapter_name])


@dataclass(frozen=True)
class _Factors:
    """One module's LoRA factors; the update to the base weight is ``orient(B @ A) * scaling``."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    transpose: bool  # Conv1D (fan_in_fan_out) and embeddings store the weight as (in, out)

    def low_rank(self, coef: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, Y) with ``X @ Y = coef * update`` already in the base weight's orientation."""
        a, b = self.A.float(), self.B.float()
        if self.transpose:
            return (a * (coef * self.scaling)).T, b.T
        return b * (coef * self.scaling), a


def _as_adapter(obj: "LoraAdapter | PeftModel | str | Path", name: str) -> LoraAdapter:
    if isinstance(obj, LoraAdapter):
        return obj
    if isinstance(obj, PeftModel):
        return LoraAdapter.from_peft_model(obj, obj.active_adapter)
    if isinstance(obj, (str, Path)):
        return LoraAdapter.from_dir(obj)
    raise MergeError(f"adapter {name!r}: expected LoraAdapter, PeftModel or adapter dir, got {type(obj).__name__}")


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    # Same matching rule as peft's get_pattern_key: the pattern must match a dotted suffix.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _factors_by_base_key(adapter: LoraAdapter, name: str, base_keys: set[str]) -> dict[str, _Factors]:
    """Map each LoRA-targeted base weight key (e.g. ``transformer.h.0.attn.c_attn.weight``) to its factors."""
    cfg = adapter.config
    unsupported = {
        "use_dora": getattr(cfg, "use_dora", False),
        "modules_to_save": bool(cfg.modules_to_save),
        "bias": cfg.bias != "none",
        "lora_bias": getattr(cfg, "lora_bias", False),
        "target_parameters": bool(getattr(cfg, "target_parameters", None)),
        "layer_replication": bool(getattr(cfg, "layer_replication", None)),
    }
    if any(unsupported.values()):
        raise MergeError(f"adapter {name!r} uses {[k for k, v in unsupported.items() if v]}: not a pure "
                         "low-rank update, so the exact soup is not implemented for it")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    for key, tensor in adapter.tensors.items():
        for suffix, (factor, is_emb) in _FACTOR_SUFFIXES.items():
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix(_PEFT_PREFIX)
                parts.setdefault(module, {})[factor] = tensor
                embedding[module] = is_emb
                break
        else:
            raise MergeError(f"adapter {name!r}: unexpected tensor {key!r} (only LoRA A/B factors are supported)")
    out = {}
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise MergeError(f"adapter {name!r}: module {module!r} has only LoRA factor(s) {sorted(ab)}")
        base_key = f"{module}.weight"
        if base_key not in base_keys:
            raise MergeError(f"adapter {name!r} targets {base_key!r}, which is not in the base state dict")
        rank = ab["A"].shape[0]
        alpha = _pattern_value(cfg.alpha_pattern or {}, module, cfg.lora_alpha)
        scaling = alpha / math.sqrt(rank) if cfg.use_rslora else alpha / rank
        out[base_key] = _Factors(ab["A"], ab["B"], scaling, bool(cfg.fan_in_fan_out) or embedding[module])
    return out


def _check_base(base: Mapping[str, torch.Tensor]) -> None:
    wrapped = [k for k in base if ".base_layer." in k or ".lora_" in k]
    if wrapped:
        raise MergeError(f"base state dict contains LoRA-wrapped keys such as {wrapped[0]!r}; pass the state dict "
                         "of the plain base model, not of a PeftModel")


def _alias_groups(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Keys that share storage (tied weights such as GPT-2's wte / lm_head), each mapped to its group."""
    by_ptr: dict[tuple[int, tuple], list[str]] = {}
    for key, t in state.items():
        by_ptr.setdefault((t.data_ptr(), tuple(t.shape)), []).append(key)
    return {key: group for group in by_ptr.values() for key in group}


def _apply_low_rank(base: Mapping[str, torch.Tensor],
                    terms: Mapping[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> StateDict:
    """``base + Σ X @ Y`` per key, as independent output tensors; tied keys get their group's sum.

    All terms of a weight go through one ``addmm`` over the concatenated ranks: one pass over the
    base weight, which is what bounds the merge's speed.
    """
    groups = _alias_groups(base)
    out: StateDict = {}
    for key, tensor in base.items():
        group_terms = [t for k in groups[key] for t in terms.get(k, ())]
        if not group_terms:
            out[key] = tensor.detach().clone()
            continue
        x = torch.cat([x for x, _ in group_terms], dim=1).to(tensor.device)
        y = torch.cat([y for _, y in group_terms], dim=0).to(tensor.device)
        out[key] = torch.addmm(tensor.detach().float(), x, y).to(tensor.dtype)
    return out


def _state_of(model: "Mapping[str, torch.Tensor] | torch.nn.Module") -> Mapping[str, torch.Tensor]:
    return model.state_dict() if isinstance(model, torch.nn.Module) else model


def _base_state_of(base: "Mapping[str, torch.Tensor] | torch.nn.Module") -> Mapping[str, torch.Tensor]:
    state = _state_of(base)
    _check_base(state)
    return state


def merge_lora_exact(
    base: "Mapping[str, torch.Tensor] | torch.nn.Module",
    adapters: Mapping[str, "LoraAdapter | PeftModel | str | Path"],
    weights: Mapping[str, float],
) -> StateDict:
    """Exact soup of LoRA policies on a shared base: ``base + Σ wᵢ·Bᵢ Aᵢ·scalingᵢ`` per targeted weight.

    Adapters may differ in rank, alpha and target modules (an untargeted module contributes 0).
    """
    weights = validate_weights(weights, list(adapters))
    base_state = _base_state_of(base)
    terms: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, w in weights.items():
        if w == 0.0:
            continue
        for key, f in _factors_by_base_key(_as_adapter(adapters[name], name), name, set(base_state)).items():
            terms.setdefault(key, []).append(f.low_rank(w))
    return _apply_low_rank(base_state, terms)


def merge_lora_factors_separately(
    base: "Mapping[str, torch.Tensor] | torch.nn.Module",
    adapters: Mapping[str, "LoraAdapter | PeftModel | str | Path"],
    weights: Mapping[str, float],
) -> StateDict:
    """For comparison only: ``(Σ wᵢ Bᵢ)(Σ wᵢ Aᵢ)·scaling``, the factor-wise average the original P-Soups
    code used. Not the soup of the policies (cross terms Bᵢ Aⱼ appear). Needs equal targets, ranks, scalings.
    """
    weights = validate_weights(weights, list(adapters))
    base_state = _base_state_of(base)
    factors = {n: _factors_by_base_key(_as_adapter(adapters[n], n), n, set(base_state)) for n in weights}
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
        if any(f.A.shape != ref.A.shape or f.B.shape != ref.B.shape or f.scaling != ref.scaling for f in fs):
            raise MergeError(f"factor-wise merge needs equal ranks and scalings at {key!r}")
        a = sum(weights[n] * f.A.float() for n, f in zip(names, fs))
        b = sum(weights[n] * f.B.float() for n, f in zip(names, fs))
        terms[key] = [_Factors(a, b, ref.scaling, ref.transpose).low_rank(1.0)]
    return _apply_low_rank(base_state, terms)


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
        adapter = _as_adapter(adapters[name], name)
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


def merge(
    method: str,
    weights: Mapping[str, float],
    *,
    base: "Mapping[str, torch.Tensor] | torch.nn.Module | None" = None,
    adapters: Mapping[str, "LoraAdapter | PeftModel | str | Path"] | None = None,
    full_models: Mapping[str, "Mapping[str, torch.Tensor] | torch.nn.Module"] | None = None,
    density: float | None = None,
) -> StateDict:
    """One entry point for every soup; ``method`` in ``METHODS``.

    ``exact_lora`` / ``lora_factors_linear`` need ``base`` (state dict or module) and ``adapters``;
    ``ties`` / ``dare_ties`` / ``dare_linear`` need ``base`` as an ``nn.Module``, ``adapters`` and
    ``density`` in (0, 1]; ``full`` needs ``full_models``.
    """
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; expected one of {METHODS}")
    if method == "full":
        if full_models is None:
            raise MergeError("method 'full' needs full_models={name: state dict or model}")
        return merge_full(full_models, weights)
    if base is None or adapters is None:
        raise MergeError(f"method {method!r} needs base= and adapters=")
    if method == "exact_lora":
        return merge_lora_exact(base, adapters, weights)
    if method == "lora_factors_linear":
        return merge_lora_factors_separately(base, adapters, weights)
    if not isinstance(base, torch.nn.Module):
        raise MergeError(f"method {method!r} runs through peft and needs base as an nn.Module, "
                         f"got {type(base).__name__}")
    if density is None or not 0.0 < density <= 1.0:
        raise MergeError(f"method {method!r} needs density in (0, 1], got {density!r}")
    return merge_with_peft(base, adapters, weights, method, density)
