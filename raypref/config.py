"""Typed job configs: plain dataclasses, loaded from YAML and overridden from the CLI.

Every job declares one (possibly nested) ``@dataclass`` whose defaults run the embedded
default on one CPU machine. ``parse_args`` layers, in order: the dataclass defaults, an
optional ``--config file.yaml``, then ``--field value`` / ``--section.field value`` flags,
and calls the config's ``validate()`` if it has one. Unknown keys, values of the wrong type,
duplicate YAML keys and YAML syntax errors raise ``ConfigError`` naming the key, flag, file
or line. ``--help`` describes each field from the ``# comment`` beside it in the source.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown, its value is wrong, or a config file cannot be read."""


def check_fields(where: str, obj: Any, checks: list[tuple[str, bool, str]]) -> None:
    """Raise ``ValueError("<where>.<field>=<value>: <rule>")`` for the first failed check.

    ``checks``: ``(field, ok, rule)`` triples; a field may be dotted (``training.steps``)."""
    for name, ok, rule in checks:
        if not ok:
            value = obj
            for part in name.split("."):
                value = getattr(value, part)
            raise ValueError(f"{where}.{name}={value!r}: {rule}")


def to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts (for YAML, MLflow params, hashing)."""
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build ``cls`` from nested dicts, checking every key and value type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        hints_text = "; ".join(_did_you_mean(k, fields) for k in unknown)
        raise ConfigError(
            f"{where.rstrip('.') or cls.__name__}: unknown key(s) {unknown}{hints_text}; "
            f"known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    return cls(**kwargs)


def _did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not match {type_name(tp)}: {'; '.join(errors)}")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, where + ".")
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def type_name(tp: Any) -> str:
    """`list[str]`, `str | None`, `int`: a type as a person writes it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------- YAML files

class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (YAML itself keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may repeat keys
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.setdefault(key, line)
                except TypeError:  # unhashable key: SafeLoader reports it below
                    continue
                if first != line:
                    raise ConfigError(f"{key_node.start_mark.name}:{line}: duplicate key "
                                      f"{key!r} (first set on line {first})")
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict; every failure is a ConfigError naming the file (and line)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a .yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path}: cannot read it ({err})") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, name: str) -> dict:
    """Parse YAML `text` read from `name` (a file name, for the messages) into a mapping."""
    loader = UniqueKeyLoader(text)
    loader.name = name  # marks (error positions) carry this name
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = err.problem or err.context or "cannot parse"
        if err.context and err.problem and err.context_mark:
            problem += f" ({err.context} on line {err.context_mark.line + 1})"
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{name}: YAML error: {err}") from None
    finally:
        loader.dispose()
    if data is None:  # an empty file (or only comments): no overrides
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: top level must be a mapping of config fields "
                          f"(key: value lines), got a {type(data).__name__}")
    return data


# ---------------------------------------------------------------- field descriptions

def field_comments(cls: type) -> dict[str, str]:
    """{field: description} from the ``# comment`` on each field's line(s) in the class
    source, or the full-line comments right above it; fields of base classes included."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_own_field_comments(klass))  # cached: read once per class
    return out


@functools.lru_cache(maxsize=None)
def _own_field_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined in a REPL or exec: no source to read
        return {}
    trailing: dict[int, str] = {}  # line -> comment after code on that line
    full_line: dict[int, str] = {}  # line -> comment alone on its line
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            text = tok.string.lstrip("#").strip()
            (full_line if not lines[row - 1][:col].strip() else trailing)[row] = text
    class_node = ast.parse(source).body[0]
    out = {}
    for node in class_node.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        parts = []
        row = node.lineno - 1
        while row in full_line:  # the comment block directly above the field
            parts.insert(0, full_line[row])
            row -= 1
        parts += [trailing[r] for r in range(node.lineno, node.end_lineno + 1) if r in trailing]
        if parts:
            out[node.target.id] = " ".join(parts)
    return out


@dataclasses.dataclass
class FieldInfo:
    """One command-line flag: a leaf field of the (nested) config."""

    key: str  # dotted: "runner.lr"
    type: Any
    default: Any
    help: str  # from the source comment; "" if none


def config_fields(cls: type, instance: Any = None, prefix: str = "") -> list[FieldInfo]:
    """Every leaf field of `cls`, in declaration order, following nested dataclass fields
    (a nested field whose default is None stays one flag that takes a mapping)."""
    instance = cls() if instance is None else instance
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            out += config_fields(type(value), value, f"{prefix}{f.name}.")
        else:
            out.append(FieldInfo(f"{prefix}{f.name}", hints[f.name], value, comments.get(f.name, "")))
    return out


def _sections(cls: type, instance: Any = None, prefix: str = "") -> dict[str, str]:
    """{"runner.": "description"} for each nested dataclass field (for --help groups)."""
    instance = cls() if instance is None else instance
    comments = field_comments(cls)
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            doc = _own_doc(type(value))
            note = comments.get(f.name, "")
            text = " ".join(x for x in (doc, f"({note})" if note else "") if x)
            out[f"{prefix}{f.name}."] = textwrap.fill(text, 88)
            out.update(_sections(type(value), value, f"{prefix}{f.name}."))
    return out


def _own_doc(cls: type) -> str:
    """The class docstring, not the signature dataclasses invents when there is none."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc)


def _show(value: Any, limit: int = 60) -> str:
    """A default as a person would type it on the command line (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("...").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- command-line values

def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) in (list, tuple)


def _non_none(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _scalar_from_cli(tp: Any, raw: str, flag: str) -> Any:
    """One value as typed. A str field keeps the text as is (`--run_name 2024` is "2024"),
    unless it is YAML-quoted ('' is ""); an optional field reads '' and null as None;
    anything else is a YAML scalar (`1e-4`, `true`, `{a: 1}`)."""
    options = _non_none(tp)
    optional = type(None) in typing.get_args(tp)
    if optional and raw.strip() in ("", "null", "~", "None", "none"):
        return None
    if str in options:
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        if quoted:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = None
            if isinstance(value, str):
                return value
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"{flag}: cannot read {raw!r} as {type_name(tp)}: "
                          f"{getattr(err, 'problem', err)}") from None


def value_from_cli(tp: Any, raw: str, flag: str) -> Any:
    """What a person typed for `flag`, read for a field of type `tp` and checked.

    Lists: '' or [] is the empty list, a YAML flow list `[a, b]` is read as such, and any
    other value is a one-element list (`--shard_formats jsonl`)."""
    list_type = next((t for t in _non_none(tp) if _is_list(t)), None)
    if list_type is not None:
        text = raw.strip()
        if text in ("", "[]"):
            value: Any = []
        elif text.startswith("["):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ConfigError(f"{flag}: cannot read {raw!r} as a list: "
                                  f"{getattr(err, 'problem', err)}") from None
        else:
            args = typing.get_args(list_type)
            value = [_scalar_from_cli(args[0] if args else Any, raw, flag)]
    elif raw.strip() == "" and any(typing.get_origin(t) is dict for t in _non_none(tp)):
        value = {}
    else:
        value = _scalar_from_cli(tp, raw, flag)
        if value is None and type(None) not in typing.get_args(tp):
            raise ConfigError(f"{flag}: expected {type_name(tp)}, got {raw!r}")
    return _coerce(tp, value, flag)


# ---------------------------------------------------------------- the parser

def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: {part} is not a section")
    node[parts[-1]] = value


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _field_help(info: FieldInfo) -> str:
    parts = [info.help] if info.help else []
    parts.append(f"({type_name(info.type)}, default: {_show(info.default)})")
    return " ".join(parts).replace("%", "%%")  # argparse %-formats help strings


def build_parser(cls: type, description: str | None = None) -> tuple[argparse.ArgumentParser,
                                                                      dict[str, FieldInfo]]:
    """The argparse parser of `cls`: one flag per leaf field, grouped by section, with help
    text from the source comments. Returns it and the fields by dotted key."""
    parser = argparse.ArgumentParser(
        description=description or _own_doc(cls) or None, allow_abbrev=False,
        usage="%(prog)s [-h] [--config FILE.yaml] [--FIELD VALUE | --SECTION.FIELD VALUE ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Values are read as typed: --lr 1e-4, --flag true, --items '[a, b]' or "
               "--items a (one item), --items '' (empty list), --name '' (empty text).")
    parser.add_argument("--config", metavar="FILE.yaml",
                        help="YAML file with any subset of the fields below")
    fields = {info.key: info for info in config_fields(cls)}
    sections = _sections(cls)
    groups: dict[str, Any] = {}
    for key, info in fields.items():
        section = key[: key.rfind(".") + 1]
        if section and section not in groups:
            groups[section] = parser.add_argument_group(
                section.rstrip("."), sections.get(section, "").replace("%", "%%") or None)
        target = groups.get(section, parser)
        is_bool = bool in _non_none(info.type) and not _is_list(info.type)
        target.add_argument(f"--{key}", dest=key, metavar="VALUE", default=argparse.SUPPRESS,
                            help=_field_help(info), **({"nargs": "?", "const": "true"} if is_bool else {}))
    return parser, fields


def parse_args(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Defaults < ``--config file.yaml`` < ``--a.b value`` flags; then ``cfg.validate()``.

    Flag values are read for their field's type (see ``value_from_cli``): ``--lr 1e-4``,
    ``--flag true`` (or just ``--flag``), ``--prefs '[P1A, P2B]'``, ``--prefs P1A``,
    ``--test_data ''``. Raises ConfigError naming the flag, key, file or line at fault.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, fields = build_parser(cls, description)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
        if flags:
            known = ["--config"] + [f"--{k}" for k in fields]
            raise ConfigError("; ".join(f"unknown flag {f}{_did_you_mean(f, known)}" for f in flags)
                              + " (--help lists every flag)")
        raise ConfigError(f"unexpected argument(s) {unknown}: every value follows its --flag")
    data = to_dict(cls())
    if args.config:
        data = _merge(data, load_yaml(args.config))
    for key, raw in vars(args).items():
        if key != "config":
            _set_path(data, key, value_from_cli(fields[key].type, raw, f"--{key}"))
    try:
        cfg = from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{args.config}: {err}" if args.config else str(err)) from None
    if hasattr(cfg, "validate"):
        try:
            cfg.validate()
        except ValueError as err:  # checked before Ray or any training starts
            raise ConfigError(str(err)) from None
    return cfg


def config_hash(cfg: Any, length: int = 12) -> str:
    """Stable short hash of a config (for caching outputs by config)."""
    import hashlib

    text = json.dumps(to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
