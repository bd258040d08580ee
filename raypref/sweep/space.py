"""Search spaces: a YAML file of `config path -> distribution`, checked against the job's config
dataclass before any trial starts, then sampled by Optuna (define-by-run).

    params:
      training.beta: {distribution: loguniform, low: 0.05, high: 1.0}
      training.lora.r: {distribution: choice, values: [2, 4, 8]}
      weights: {distribution: simplex, keys: [P1A, P2A, P3A]}

Distributions: uniform / loguniform (low, high), int / logint (low, high, step), choice
(values), simplex (keys, min): a weight per key, the weights sum to 1, each >= min. A simplex
is sampled as one uniform draw per key mapped through -log and normalised (uniform on the
simplex); the raw draws are what Optuna sees, `SearchSpace.resolve` turns them into weights.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypref.config import ConfigError, _set_path, from_dict, load_yaml, to_dict

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "choice", "simplex")
_KEYS = {  # the keys each distribution takes (besides "distribution")
    "uniform": {"low", "high"}, "loguniform": {"low", "high"},
    "int": {"low", "high", "step"}, "logint": {"low", "high"},
    "choice": {"values"}, "simplex": {"keys", "min"},
}
_RATIO_WORDS = ("ratio", "weight")  # fields holding ratios / weights may not go negative
_SIMPLEX_DRAW_FLOOR = 1e-6  # -log(0) is infinite: draws start just above 0


class SpaceError(ConfigError):
    """A search space is invalid; the message names the file and the parameter."""


@dataclass(frozen=True)
class Param:
    """One searched config field, addressed by its dotted path in the job config."""

    path: str
    distribution: str
    low: float | None = None
    high: float | None = None
    step: int | None = None
    values: tuple = ()
    keys: tuple[str, ...] = ()
    min: float = 0.0  # simplex: the smallest weight of a key

    def suggest(self, trial) -> None:
        """Ask an Optuna trial (or Tune's captor of one) for this parameter's raw value(s)."""
        if self.distribution in ("uniform", "loguniform"):
            trial.suggest_float(self.path, self.low, self.high, log=self.distribution == "loguniform")
        elif self.distribution in ("int", "logint"):
            trial.suggest_int(self.path, int(self.low), int(self.high), step=self.step or 1,
                              log=self.distribution == "logint")
        elif self.distribution == "choice":  # by index: Optuna takes only scalar choices
            trial.suggest_categorical(self.path, list(range(len(self.values))))
        else:
            for key in self.keys:
                trial.suggest_float(self.raw_name(key), _SIMPLEX_DRAW_FLOOR, 1.0)

    def raw_name(self, key: str) -> str:
        return f"{self.path}[{key}]"

    def value(self, raw: dict[str, Any]) -> Any:
        """The config value of this parameter from Optuna's raw draws."""
        if self.distribution == "choice":
            return self.values[int(raw[self.path])]
        if self.distribution == "simplex":
            return simplex_weights({k: raw[self.raw_name(k)] for k in self.keys}, self.min)
        return raw[self.path]

    def corners(self) -> list[Any]:
        """Extreme values, checked against the job config before the sweep starts."""
        if self.distribution == "choice":
            return list(self.values)
        if self.distribution == "simplex":
            return [simplex_weights({k: 1.0 for k in self.keys}, self.min)]
        if self.distribution in ("int", "logint"):
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]


def simplex_weights(draws: dict[str, float], floor: float = 0.0) -> dict[str, float]:
    """Uniform (0, 1] draws -> weights on the simplex (exponential spacings), each >= floor."""
    spacings = {k: -math.log(max(u, _SIMPLEX_DRAW_FLOOR)) for k, u in draws.items()}
    total = sum(spacings.values())
    if total <= 0:  # every draw was exactly 1: the centre of the simplex
        spacings, total = {k: 1.0 for k in draws}, float(len(draws))
    free = 1.0 - floor * len(draws)
    return {k: floor + free * s / total for k, s in spacings.items()}


@dataclass
class SearchSpace:
    """The validated parameters of one sweep, in file order."""

    params: list[Param] = field(default_factory=list)
    source: str = "<dict>"

    def suggest(self, trial) -> None:
        """Optuna define-by-run function (OptunaSearch(space=space.suggest))."""
        for param in self.params:
            param.suggest(trial)

    def describe(self) -> dict[str, dict]:
        """The space as plain data (for logs and MLflow)."""
        out = {}
        for p in self.params:
            keep = {"low": p.low, "high": p.high, "step": p.step, "values": list(p.values) or None,
                    "keys": list(p.keys) or None, "min": p.min if p.distribution == "simplex" else None}
            out[p.path] = {"distribution": p.distribution,
                           **{k: v for k, v in keep.items() if v is not None}}
        return out

    def optuna_distributions(self) -> dict:
        """{raw name: optuna distribution} of what `suggest` asks for (to rebuild a study)."""
        from optuna.distributions import (CategoricalDistribution, FloatDistribution,
                                          IntDistribution)

        out = {}
        for p in self.params:
            if p.distribution in ("uniform", "loguniform"):
                out[p.path] = FloatDistribution(p.low, p.high, log=p.distribution == "loguniform")
            elif p.distribution in ("int", "logint"):
                out[p.path] = IntDistribution(int(p.low), int(p.high), step=p.step or 1,
                                              log=p.distribution == "logint")
            elif p.distribution == "choice":
                out[p.path] = CategoricalDistribution(list(range(len(p.values))))
            else:
                for key in p.keys:
                    out[p.raw_name(key)] = FloatDistribution(_SIMPLEX_DRAW_FLOOR, 1.0)
        return out

    def resolve(self, raw: dict[str, Any]) -> dict[str, Any]:
        """{config path: value} of one trial from its raw Tune/Optuna config."""
        return {p.path: p.value(raw) for p in self.params}

    def apply(self, config_cls: type, base: dict, raw: dict[str, Any]):
        """The job config of one trial: `base` (a config dict) with this trial's values."""
        return build_config(config_cls, base, self.resolve(raw))


def build_config(config_cls: type, base: dict, overrides: dict[str, Any]):
    """`config_cls` from the dict `base` with dotted-path overrides, type-checked."""
    import copy

    data = copy.deepcopy(base)
    for path, value in overrides.items():
        _set_path(data, path, value)
    return from_dict(config_cls, data)


def load_space(path: str | Path, config_cls: type, base: dict | None = None) -> SearchSpace:
    """Read and validate a space file (see `parse_space`)."""
    data = load_yaml(path)
    if "params" not in data:
        raise SpaceError(f"{path}: needs a 'params' mapping of config path -> distribution")
    return parse_space(data["params"], config_cls, base, source=str(path))


def parse_space(params: dict, config_cls: type, base: dict | None = None,
                source: str = "<dict>") -> SearchSpace:
    """Validate every parameter against `config_cls` (a dataclass) and return the space.

    Raises SpaceError naming the file and parameter for: a path that is not a field of the
    config, a bad distribution name or keys, an empty or reversed range, log ranges through 0,
    negative ratios / weights, and values the config itself rejects (type or its validate()).
    """
    if not isinstance(params, dict) or not params:
        raise SpaceError(f"{source}: 'params' must be a non-empty mapping of config path -> distribution")
    base = to_dict(config_cls()) if base is None else base
    space = SearchSpace(source=source)
    for path, spec in params.items():
        where = f"{source}: parameter {path!r}"
        field_type = field_type_of(config_cls, path, where)
        param = _parse_param(path, spec, where)
        _check_ratio(param, where)
        _check_against_config(param, config_cls, base, field_type, where)
        space.params.append(param)
    return space


def field_type_of(config_cls: type, path: str, where: str) -> Any:
    """The annotated type of a dotted field path; SpaceError if a part is not a field."""
    cls, tp = config_cls, None
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise SpaceError(f"{where}: {'.'.join(parts[:i])} is not a config section")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            known = sorted(f.name for f in dataclasses.fields(cls))
            raise SpaceError(f"{where}: unknown parameter: {cls.__name__} has no field {part!r}; "
                             f"known: {known}")
        tp = hints[part]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        cls = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) \
            and len(args) == 1 else tp  # Optional[Section] -> Section
    return tp


def _parse_param(path: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict) or "distribution" not in spec:
        raise SpaceError(f"{where}: expected a mapping with 'distribution' (one of {DISTRIBUTIONS})")
    name = spec["distribution"]
    if name not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: unknown distribution {name!r}; use one of {DISTRIBUTIONS}")
    extra = sorted(set(spec) - _KEYS[name] - {"distribution"})
    if extra:
        raise SpaceError(f"{where}: {name} takes {sorted(_KEYS[name])}, not {extra}")
    if name == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SpaceError(f"{where}: choice needs a non-empty list 'values' (empty range)")
        return Param(path, name, values=tuple(values))
    if name == "simplex":
        keys = spec.get("keys")
        if not isinstance(keys, list) or len(keys) < 2 or len(set(map(str, keys))) != len(keys):
            raise SpaceError(f"{where}: simplex needs 'keys': a list of at least 2 distinct names")
        floor = _number(spec.get("min", 0.0), "min", where)
        if floor < 0:
            raise SpaceError(f"{where}: simplex min={floor} is a negative ratio")
        if floor * len(keys) >= 1.0:
            raise SpaceError(f"{where}: simplex min={floor} x {len(keys)} keys >= 1 leaves an empty range")
        return Param(path, name, keys=tuple(map(str, keys)), min=floor)
    if "low" not in spec or "high" not in spec:
        raise SpaceError(f"{where}: {name} needs 'low' and 'high'")
    low, high = _number(spec["low"], "low", where), _number(spec["high"], "high", where)
    if low >= high:
        raise SpaceError(f"{where}: low={low} >= high={high} (empty range)")
    if name in ("loguniform", "logint") and low <= 0:
        raise SpaceError(f"{where}: {name} needs low > 0, got {low}")
    step = None
    if name in ("int", "logint"):
        if low != int(low) or high != int(high):
            raise SpaceError(f"{where}: {name} bounds must be integers, got {low}, {high}")
        step = spec.get("step", 1)
        if not isinstance(step, int) or step < 1 or step > high - low:
            raise SpaceError(f"{where}: step={step!r} must be an integer in [1, high - low]")
    return Param(path, name, low=low, high=high, step=step)


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpaceError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _check_ratio(param: Param, where: str) -> None:
    leaf = param.path.rsplit(".", 1)[-1].lower()
    if not any(word in leaf for word in _RATIO_WORDS):
        return
    numbers = [param.low] if param.low is not None else []
    for value in param.values:  # a choice of ratio vectors, or of single ratios
        numbers += list(value.values()) if isinstance(value, dict) else \
            list(value) if isinstance(value, (list, tuple)) else [value]
    negative = [v for v in numbers if isinstance(v, (int, float)) and v < 0]
    if negative:
        raise SpaceError(f"{where}: negative ratio {negative[0]} (ratios and weights must be >= 0)")


def _check_against_config(param: Param, config_cls: type, base: dict, field_type: Any,
                          where: str) -> None:
    """Every corner of the range must build a valid config (types, then the config's validate)."""
    if param.distribution in ("uniform", "loguniform") and field_type is int:
        raise SpaceError(f"{where}: the field is an integer; use int, logint or choice")
    for value in param.corners():
        try:
            cfg = build_config(config_cls, base, {param.path: value})
            if hasattr(cfg, "validate"):
                cfg.validate()
        except (ConfigError, ValueError, TypeError) as err:
            raise SpaceError(f"{where}: value {value!r} is not valid for the job config: {err}") from None
