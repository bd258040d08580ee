"""LoRA adapter factors, one module at a time, in the orientation of the base weight.

peft stores a LoRA update as factors ``A`` (r × in) and ``B`` (out × r), but the base weight
they update is laid out differently per module type: ``nn.Linear`` keeps (out, in), GPT-2's
``Conv1D`` keeps (in, out) (peft's ``fan_in_fan_out``), ``nn.Embedding`` keeps (vocab, dim) with
``lora_embedding_A`` (r × vocab) and ``lora_embedding_B`` (dim × r). The adapter's
``fan_in_fan_out`` flag is one value for the whole adapter (and peft rewrites it while wrapping
modules), so it cannot describe a model that mixes Conv1D and Linear targets: the orientation is
decided here per module, from the module's type.

Every update is returned as ``ModuleFactors``: ``ΔW = scaling · X @ Y`` with ``X @ Y`` already in
the stored weight's shape. Merging adds ``w · ΔW`` to the weight; serving applies it to the
activations (``apply``) without ever forming ``ΔW``.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict

LINEAR, CONV1D, EMBEDDING = "linear", "conv1d", "embedding"
KINDS = (LINEAR, CONV1D, EMBEDDING)
_PEFT_PREFIX = "base_model.model."
# peft key suffixes -> factor; embeddings store raw Parameters, linears / Conv1D a `.weight`.
_FACTOR_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
}


class AdapterError(ValueError):
    """An adapter that cannot be read as a pure low-rank update of the given base."""


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
                raise AdapterError(f"adapter directory {path} has no {f.name}")
        raw = json.loads(config_file.read_text())
        config = LoraConfig(**{k: v for k, v in raw.items() if k != "peft_type"})
        return cls(load_file(str(weights_file)), config)

    @classmethod
    def from_peft_model(cls, model: PeftModel, adapter_name: str = "default") -> "LoraAdapter":
        """Snapshot one adapter of an in-memory ``PeftModel``."""
        if adapter_name not in model.peft_config:
            raise AdapterError(f"PeftModel has no adapter {adapter_name!r}; it has {sorted(model.peft_config)}")
        tensors = get_peft_model_state_dict(model, adapter_name=adapter_name)
        return cls({k: v.detach().clone() for k, v in tensors.items()}, model.peft_config[adapter_name])


def as_adapter(obj: "LoraAdapter | PeftModel | str | Path", name: str) -> LoraAdapter:
    if isinstance(obj, LoraAdapter):
        return obj
    if isinstance(obj, PeftModel):
        return LoraAdapter.from_peft_model(obj, obj.active_adapter)
    if isinstance(obj, (str, Path)):
        return LoraAdapter.from_dir(obj)
    raise AdapterError(f"adapter {name!r}: expected LoraAdapter, PeftModel or adapter dir, got {type(obj).__name__}")


@dataclass(frozen=True)
class ModuleFactors:
    """One module's update ``ΔW = scaling · X @ Y``, ``X @ Y`` shaped like the stored weight."""

    X: torch.Tensor  # (weight rows, r)
    Y: torch.Tensor  # (r, weight cols)
    scaling: float
    kind: str  # how the module uses its weight: LINEAR (out, in), CONV1D (in, out), EMBEDDING (vocab, dim)

    def delta(self) -> torch.Tensor:
        return (self.X.float() @ self.Y.float()) * self.scaling

    def as_kind(self, kind: str) -> "ModuleFactors":
        """The same ΔW seen by another module sharing the weight (e.g. a tied ``lm_head``)."""
        return ModuleFactors(self.X, self.Y, self.scaling, kind)

    def apply(self, x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """The update's contribution to the module's output for input ``x``, times ``coef``
        (broadcast over the leading dimensions of ``x``; one soup weight per batch row)."""
        if self.kind == LINEAR:  # y = x Wᵀ  -> x Yᵀ Xᵀ
            low = x @ self.Y.T
            up = self.X.T
        elif self.kind == CONV1D:  # y = x W -> x X Y
            low = x @ self.X
            up = self.Y
        else:  # y = W[ids] -> X[ids] Y
            low = torch.nn.functional.embedding(x, self.X)
            up = self.Y
        return (low * (coef * self.scaling)) @ up


def module_kinds(model: torch.nn.Module) -> dict[str, str]:
    """``{module name: kind}`` for every module LoRA can target here (Linear, Conv1D, Embedding)."""
    from transformers.pytorch_utils import Conv1D

    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            kinds[name] = CONV1D
        elif isinstance(module, torch.nn.Linear):
            kinds[name] = LINEAR
        elif isinstance(module, torch.nn.Embedding):
            kinds[name] = EMBEDDING
    return kinds


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    # Same matching rule as peft's get_pattern_key: the pattern must match a dotted suffix.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_pure_low_rank(cfg: LoraConfig, name: str) -> None:
    unsupported = {
        "use_dora": getattr(cfg, "use_dora", False),
        "modules_to_save": bool(cfg.modules_to_save),
        "bias": cfg.bias != "none",
        "lora_bias": getattr(cfg, "lora_bias", False),
        "target_parameters": bool(getattr(cfg, "target_parameters", None)),
        "layer_replication": bool(getattr(cfg, "layer_replication", None)),
    }
    if any(unsupported.values()):
        raise AdapterError(f"adapter {name!r} uses {[k for k, v in unsupported.items() if v]}: not a pure "
                           "low-rank update, so the exact soup is not implemented for it")


def _kind_from_shape(module: str, weight_shape: tuple, a: torch.Tensor, b: torch.Tensor,
                     is_embedding: bool, fan_in_fan_out: bool, name: str, ambiguous: list[str]) -> str:
    """Without the module itself: the kind the shapes allow; a square weight is ambiguous and
    falls back on the adapter-wide ``fan_in_fan_out`` flag (pass the base model to avoid it)."""
    if is_embedding:
        return EMBEDDING
    product = (b.shape[0], a.shape[1])
    if product != tuple(weight_shape) and product[::-1] == tuple(weight_shape):
        return CONV1D
    if product == tuple(weight_shape) and product[0] != product[1]:
        return LINEAR
    if product == tuple(weight_shape):
        ambiguous.append(module)
        return CONV1D if fan_in_fan_out else LINEAR
    raise AdapterError(f"adapter {name!r}, module {module!r}: LoRA product {product} does not fit the base "
                       f"weight {tuple(weight_shape)}")


def adapter_factors(adapter: LoraAdapter, name: str, base_state: Mapping[str, torch.Tensor],
                    kinds: Mapping[str, str] | None = None) -> dict[str, ModuleFactors]:
    """``{base weight key: ModuleFactors}`` of one adapter (e.g. ``transformer.h.0.attn.c_attn.weight``).

    ``base_state``: the base model's state dict. ``kinds``: the base model's ``module_kinds``
    (decides each module's orientation from its type); without it, shapes decide.
    """
    cfg = adapter.config
    _check_pure_low_rank(cfg, name)
    base_shapes = {k: tuple(v.shape) for k, v in base_state.items()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, bool] = {}
    for key, tensor in adapter.tensors.items():
        if key.endswith(".base_layer.weight"):
            # peft's save_embedding_layers keeps a copy of a targeted embedding's base weight;
            # loading it would replace the base's, so it must be the base's own.
            base_key = key.removeprefix(_PEFT_PREFIX).replace(".base_layer.weight", ".weight")
            if base_key not in base_state or not torch.equal(base_state[base_key], tensor.to(base_state[base_key])):
                raise AdapterError(f"adapter {name!r} saves its own {base_key!r}, which differs from the base "
                                   "model's (a resized vocabulary?); merge it on the base it was trained from")
            continue
        for suffix, factor in _FACTOR_SUFFIXES.items():
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix(_PEFT_PREFIX)
                parts.setdefault(module, {})[factor] = tensor
                embedding[module] = "embedding" in suffix
                break
        else:
            raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r} (only LoRA A/B factors are supported)")
    out, ambiguous = {}, []
    for module, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: module {module!r} has only LoRA factor(s) {sorted(ab)}")
        key = f"{module}.weight"
        if key not in base_shapes:
            raise AdapterError(f"adapter {name!r} targets {key!r}, which is not in the base model")
        a, b = ab["A"], ab["B"]
        if kinds is not None:
            if module not in kinds:
                raise AdapterError(f"adapter {name!r} targets {module!r}, which is not a Linear, Conv1D or "
                                   "Embedding module of the base model")
            kind = kinds[module]
            if (kind == EMBEDDING) != embedding[module]:
                raise AdapterError(f"adapter {name!r}: module {module!r} is a {kind} but its factors are "
                                   f"stored as {'embedding' if embedding[module] else 'linear'} factors")
        else:
            kind = _kind_from_shape(module, base_shapes[key], a, b, embedding[module],
                                    bool(cfg.fan_in_fan_out), name, ambiguous)
        rank = a.shape[0]
        alpha = _pattern_value(cfg.alpha_pattern or {}, module, cfg.lora_alpha)
        scaling = alpha / math.sqrt(rank) if cfg.use_rslora else alpha / rank
        # Linear: ΔW = B A (out, in). Conv1D and Embedding store the transpose: ΔW = Aᵀ Bᵀ.
        x, y = (b, a) if kind == LINEAR else (a.T, b.T)
        if (x.shape[0], y.shape[1]) != tuple(base_shapes[key]):
            raise AdapterError(f"adapter {name!r}, module {module!r} ({kind}): update shape "
                               f"{(x.shape[0], y.shape[1])} does not fit the base weight {tuple(base_shapes[key])}")
        out[key] = ModuleFactors(x, y, scaling, kind)
    if ambiguous:
        warnings.warn(f"adapter {name!r}: square weights {ambiguous[:3]}{'...' if len(ambiguous) > 3 else ''} "
                      "oriented by the adapter-wide fan_in_fan_out flag; pass the base model (nn.Module) to "
                      "decide each module's orientation from its type", stacklevel=3)
    return out
