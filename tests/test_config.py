from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raypref.config import ConfigError, config_hash, field_comments, load_yaml, parse_args, to_dict


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


# ---------------------------------------------------------------- YAML files

def _yaml(tmp_path, text: str):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _yaml(tmp_path, "name: ok\ninner:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{path}:4:1: YAML syntax error: .*line 3"):
        parse_args(Job, ["--config", str(path)])


def test_duplicate_key_names_key_file_and_line(tmp_path):
    path = _yaml(tmp_path, "name: a\ninner:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=rf"{path}:5: duplicate key 'lr' \(first set on line 3\)"):
        parse_args(Job, ["--config", str(path)])
    top = _yaml(tmp_path, "name: a\nprefs: [P1A]\nname: b\n")
    with pytest.raises(ConfigError, match="duplicate key 'name'"):
        parse_args(Job, ["--config", str(top)])


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = _yaml(tmp_path, "base: &b {lr: 0.1, steps: 3}\n")
    assert load_yaml(path)["base"] == {"lr": 0.1, "steps": 3}
    merged = _yaml(tmp_path, "a: &a {lr: 0.1}\ninner:\n  <<: *a\n  lr: 0.2\n")
    assert load_yaml(merged)["inner"] == {"lr": 0.2}


def test_config_file_that_is_not_a_mapping_or_missing(tmp_path):
    with pytest.raises(ConfigError, match=r"list.yaml: top level must be a mapping"):
        load_yaml(_yaml_at(tmp_path / "list.yaml", "- name\n- x\n"))
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        parse_args(Job, ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError, match="is a directory"):
        load_yaml(tmp_path)
    assert parse_args(Job, ["--config", str(_yaml_at(tmp_path / "e.yaml", "# nothing\n"))]) == Job()


def _yaml_at(path, text):
    path.write_text(text)
    return path


def test_unknown_yaml_key_names_the_file_and_a_close_match(tmp_path):
    path = _yaml(tmp_path, "inner:\n  stepz: 20\n")
    with pytest.raises(ConfigError, match=rf"{path}: inner: unknown key\(s\) \['stepz'\] \(did you mean steps\?\)"):
        parse_args(Job, ["--config", str(path)])


# ---------------------------------------------------------------- command-line values

@dataclass
class Typed:
    run_name: str = "run"
    test_data: str = "shards/test"
    device: str | None = "cpu"
    user_ids: list[int] = field(default_factory=lambda: [1])
    formats: list[str] = field(default_factory=lambda: ["parquet"])
    weights: dict[str, float] = field(default_factory=lambda: {"a": 1.0})
    use_gpu: bool = False
    lr: float = 0.1


def test_bad_value_names_its_flag():
    with pytest.raises(ConfigError, match=r"^--inner\.lr: expected a number, got 'abc'$"):
        parse_args(Job, ["--inner.lr", "abc"])
    with pytest.raises(ConfigError, match=r"^--user_ids\[1\]: expected an integer, got 'x'$"):
        parse_args(Typed, ["--user_ids", "[1, x]"])
    with pytest.raises(ConfigError, match=r"^--lr: expected float, got ''$"):
        parse_args(Typed, ["--lr", ""])


def test_unknown_flag_lists_close_matches():
    with pytest.raises(ConfigError, match=r"unknown flag --inner\.setps \(did you mean --inner\.steps"):
        parse_args(Job, ["--inner.setps", "3"])
    with pytest.raises(ConfigError, match=r"unknown flag --zzz \(--help"):
        parse_args(Job, ["--zzz", "3"])


def test_values_as_a_person_types_them():
    cfg = parse_args(Typed, ["--formats", "jsonl", "--user_ids", "7", "--test_data", "",
                             "--run_name", "2024", "--device", "", "--weights", "", "--use_gpu"])
    assert cfg.formats == ["jsonl"] and cfg.user_ids == [7]
    assert cfg.test_data == "" and cfg.run_name == "2024" and cfg.device is None
    assert cfg.weights == {} and cfg.use_gpu is True
    assert parse_args(Typed, ["--user_ids", ""]).user_ids == []
    assert parse_args(Typed, ["--user_ids", "[]"]).user_ids == []
    assert parse_args(Typed, ["--user_ids", "[2, 3]"]).user_ids == [2, 3]
    assert parse_args(Typed, ["--test_data", "''"]).test_data == ""  # YAML-quoted still works
    assert parse_args(Typed, ["--use_gpu", "false", "--lr", "1e-4"]).lr == pytest.approx(1e-4)
    assert parse_args(Typed, ["--weights", "{b: 2}"]).weights == {"b": 2.0}


_plain_text = st.text(min_size=1).filter(
    lambda s: s.strip() and not s.strip().startswith("[")
    and not (len(s) >= 2 and s[0] == s[-1] and s[0] in "'\""))


@settings(max_examples=200, deadline=None)
@given(_plain_text)
def test_any_scalar_for_a_list_of_str_is_one_element(text):
    assert parse_args(Typed, [f"--formats={text}"]).formats == [text]


@settings(max_examples=200, deadline=None)
@given(_plain_text)
def test_any_text_for_a_str_field_is_kept_as_typed(text):
    assert parse_args(Typed, [f"--run_name={text}"]).run_name == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=-10**6, max_value=10**6), max_size=5))
def test_int_lists_round_trip(ids):
    flag = str(ids[0]) if len(ids) == 1 else "[" + ", ".join(map(str, ids)) + "]"
    assert parse_args(Typed, ["--user_ids", flag]).user_ids == ids


@dataclass
class Checked:
    steps: int = 1

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"Checked.steps={self.steps}: must be >= 1")


def test_parse_args_validates_before_returning():
    with pytest.raises(ConfigError, match=r"Checked.steps=0: must be >= 1"):
        parse_args(Checked, ["--steps", "0"])
    assert parse_args(Checked, ["--steps", "2"]).steps == 2


# ---------------------------------------------------------------- --help

@dataclass
class Section:
    """Optimiser settings."""

    lr: float = 1e-3  # step size
    # a comment block above a field
    # describes it too
    warmup: int = 10
    plain: int = 7


@dataclass
class Documented:
    """A small job."""

    name: str = "x"  # what the run is called (50% of people read this)
    opt: Section = field(default_factory=Section)  # tuned by hand
    tags: list[str] = field(default_factory=lambda: [
        "a", "b"])  # labels, a field spread over two lines


def _help(cls, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(cls, ["--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_field_comments_are_read_from_the_source():
    assert field_comments(Documented) == {
        "name": "what the run is called (50% of people read this)",
        "opt": "tuned by hand", "tags": "labels, a field spread over two lines"}
    assert field_comments(Section) == {"lr": "step size",
                                       "warmup": "a comment block above a field describes it too"}


def test_help_describes_each_field_with_type_and_default(capsys):
    text = _help(Documented, capsys)
    assert "A small job." in text
    assert "--name VALUE what the run is called (50% of people read this) (str, default: x)" in text
    assert "--opt.lr VALUE step size (float, default: 0.001)" in text
    assert "--opt.warmup VALUE a comment block above a field describes it too (int, default: 10)" in text
    assert "--opt.plain VALUE (int, default: 7)" in text  # no comment: type and default
    assert "--tags VALUE labels, a field spread over two lines (list[str], default: [a, b])" in text
    assert "opt: Optimiser settings. (tuned by hand)" in text


def test_help_of_a_real_job_config(capsys):
    from raypref.recipes.sft import SFTConfig

    text = _help(SFTConfig, capsys)
    # nested: the shared sections' comments, with SFT's own defaults (not the section's)
    assert "--resources.num_workers VALUE Ray Train workers (one per GPU on a cluster) (int, default: 1)" in text
    assert "--training.lr VALUE peak learning rate (float, default: 0.002)" in text
    assert "--corpus_size VALUE (prompt, response) pairs drawn from the world (int, default: 4000)" in text
    assert "--model.lora VALUE (LoraSettings | None, default: null)" in text
