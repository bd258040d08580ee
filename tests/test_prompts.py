"""Prompt sets: the project's questions (enough, varied, a disjoint fixed split) and users'
files (JSON lines or plain text) with errors that name the file and line."""
import json
from collections import Counter

import pytest

from raypref.data.prompts import (DEFAULT_PROMPTS, PromptFileError, TEST_SHARE, load_prompts,
                                  read_prompts)


def test_default_questions_are_many_varied_and_split_disjointly():
    rows = [json.loads(line) for line in DEFAULT_PROMPTS.read_text().splitlines()]
    assert len(rows) >= 300
    assert all(set(r) == {"id", "topic", "split", "prompt"} for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    topics = Counter(r["topic"] for r in rows)
    assert len(topics) >= 15 and min(topics.values()) >= 10, topics
    for topic in topics:  # every topic is in both splits
        assert {r["split"] for r in rows if r["topic"] == topic} == {"train", "test"}, topic
    train, test = load_prompts(split="train"), load_prompts(split="test")
    assert not set(train) & set(test)
    assert len(train) + len(test) == len(load_prompts()) == len(rows)
    assert 0.15 <= len(test) / len(rows) <= 0.3
    assert all(p.endswith("?") for p in train + test)


def test_user_jsonl_with_splits_and_extra_fields(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"prompt": "What is rain?", "split": "test", "source": "me"}\n\n'
                    '{"prompt": "  Why is grass green? ", "split": "train"}\n')
    assert load_prompts(path) == ["What is rain?", "Why is grass green?"]
    assert load_prompts(path, split="test") == ["What is rain?"]
    assert [p.line for p in read_prompts(path)] == [1, 3]


def test_a_file_without_splits_is_split_by_a_hash_of_each_prompt(tmp_path):
    questions = [f"Question number {i}?" for i in range(200)]
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("\n".join(questions) + "\n")
    json_file = tmp_path / "prompts.jsonl"
    json_file.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in reversed(questions)))
    test = load_prompts(text_file, split="test")
    assert set(test) == set(load_prompts(json_file, split="test"))  # the text decides, not the order
    assert not set(test) & set(load_prompts(text_file, split="train"))
    assert abs(len(test) / len(questions) - TEST_SHARE) < 0.08


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok?"}\n{"prompt": "broken?"\n', r"bad\.jsonl:2: not valid JSON"),
    ('["a list"]\n', r"bad\.jsonl:1: expected a JSON object"),
    ('{"prompt": "ok?"}\n{"text": "no prompt field"}\n', r"bad\.jsonl:2: no 'prompt' field \(has \['text'\]\)"),
    ('{"prompt": "   "}\n', r"bad\.jsonl:1: 'prompt' must be a non-empty string"),
    ('{"prompt": 3}\n', r"bad\.jsonl:1: 'prompt' must be"),
    ('{"prompt": "a?", "split": "dev"}\n', r"bad\.jsonl:1: 'split' must be one of"),
    ('{"prompt": "a?", "split": "train"}\n{"prompt": "b?"}\n', r"bad\.jsonl:2: no 'split' field"),
    ('{"prompt": "Why?", "split": "train"}\n{"prompt": "why? ", "split": "test"}\n',
     r"bad\.jsonl:2: duplicate of the prompt on line 1"),
    ('\n  \n', r"bad\.jsonl: no prompts"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(PromptFileError, match=message):
        load_prompts(path)


def test_instruction_is_read_as_the_prompt(tmp_path):
    path = tmp_path / "psoups.jsonl"
    path.write_text('{"instruction": "Explain sarcoidosis.", "input": ""}\n{"prompt": "b?"}\n')
    assert load_prompts(path) == ["Explain sarcoidosis.", "b?"]


def test_other_bad_input(tmp_path):
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\nWhat is rain?\n")
    with pytest.raises(PromptFileError, match=r"prompts.csv: use a .jsonl .* or .txt"):
        load_prompts(csv)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(tmp_path / "nope.txt")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9?\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="latin1.txt: not UTF-8"):
        load_prompts(binary)
    one = tmp_path / "one.txt"
    one.write_text("What is rain?\n")
    with pytest.raises(ValueError, match="split must be one of"):
        load_prompts(one, split="dev")
    only_train = tmp_path / "train.jsonl"
    only_train.write_text('{"prompt": "What is rain?", "split": "train"}\n')
    with pytest.raises(PromptFileError, match="train.jsonl: no prompts in split 'test'"):
        load_prompts(only_train, split="test")
