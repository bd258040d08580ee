from dataclasses import dataclass, field

import pytest

from raypref.config import ConfigError, config_hash, parse_args, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Job:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    prefs: list[str] = field(default_factory=lambda: ["P1A"])
    device: str | None = None


def test_defaults_yaml_and_flags_layer_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: fromyaml\ninner:\n  steps: 20\n")
    cfg = parse_args(Job, ["--config", str(path), "--inner.lr", "5e-4", "--prefs", "[P1B, P2A]"])
    assert cfg.name == "fromyaml"
    assert cfg.inner.steps == 20
    assert cfg.inner.lr == pytest.approx(5e-4)
    assert cfg.prefs == ["P1B", "P2A"]
    assert cfg.device is None


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  stepz: 20\n")
    with pytest.raises(ConfigError, match="stepz"):
        parse_args(Job, ["--config", str(path)])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="inner.steps"):
        parse_args(Job, ["--inner.steps", "ten"])


def test_hash_changes_with_config():
    assert config_hash(Job()) == config_hash(Job())
    assert config_hash(Job()) != config_hash(Job(inner=Inner(steps=11)))
    assert to_dict(Job())["inner"]["steps"] == 10
