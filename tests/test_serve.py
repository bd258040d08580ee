"""The Ray Serve app over HTTP on loopback: exact greedy soups, 422 for bad input, a bounded load test."""
from __future__ import annotations

import copy
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from raypref.models.factory import generate_ids, load_pretrained
from raypref.models.merge import LoraAdapter, merge_lora_exact
from raypref.serve.demo import build_demo_run
from raypref.serve.policies import find_policies

PROMPT = "tell me about rivers"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def soups_run(tmp_path_factory):
    """Two runs in one output folder: the default (train-demo) and another, served multiplexed."""
    out = build_demo_run(tmp_path_factory.mktemp("soups"))
    build_demo_run(out, preferences=("P1A", "P4B"), seed=1, training_key="train-other")
    return out


@pytest.fixture(scope="module")
def server(ray_local, soups_run):
    from ray import serve

    from raypref.serve.app import serve_soups

    url = serve_soups({"output_dir": str(soups_run), "training_key": "train-demo", "max_new_tokens": 16, "max_prompt_tokens": 40,
                       "cache_size": 2, "hot_after": 3, "torch_threads": 1}, port=_free_port())
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("the soups server did not become healthy in 120 s")
    yield url
    serve.shutdown()


def _post(url, body, timeout=120):
    return requests.post(f"{url}/v1/generate", data=json.dumps(body), timeout=timeout,
                         headers={"content-type": "application/json"})


def test_binds_loopback_and_describes_itself(server):
    assert server.startswith("http://127.0.0.1:")
    prefs = requests.get(f"{server}/v1/preferences", timeout=10).json()
    assert prefs["preferences"] == ["P1A", "P2A", "P3A"] and prefs["model_version"].startswith("train-demo/")
    schema = requests.get(f"{server}/openapi.json", timeout=10).json()
    assert {"/v1/generate", "/v1/preferences", "/healthz"} <= set(schema["paths"])


def _offline_greedy(policies, weights, n):
    base, tokenizer = load_pretrained(policies.base_dir)
    adapters = {k: LoraAdapter.from_dir(p) for k, p in policies.adapters.items()}
    merged = copy.deepcopy(base)
    merged.load_state_dict(merge_lora_exact(base, adapters, {k: weights.get(k, 0.0) for k in adapters}))
    return generate_ids(merged, tokenizer, [PROMPT], max_new_tokens=n, greedy=True)[0]


def test_several_runs_are_served_through_model_multiplexing(server, soups_run):
    from raypref.serve.app import MODEL_ID_HEADER

    other = {MODEL_ID_HEADER: "train-other"}
    prefs = requests.get(f"{server}/v1/preferences", headers=other, timeout=60).json()
    assert prefs["preferences"] == ["P1A", "P4B"] and prefs["model_version"].startswith("train-other/")
    w_other, w_demo = {"P1A": 0.3, "P4B": 0.7}, {"P1A": 0.3, "P2A": 0.7}
    jobs = [(other, w_other), ({}, w_demo), (other, w_other), ({MODEL_ID_HEADER: "train-demo"}, w_demo)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # both runs at once: Serve splits batches by run
        answers = list(pool.map(lambda j: requests.post(
            f"{server}/v1/generate", json={"prompt": PROMPT, "preferences": j[1], "max_new_tokens": 8},
            headers=j[0], timeout=120), jobs))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    for (headers, weights), r in zip(jobs, answers):
        run = headers.get(MODEL_ID_HEADER, "train-demo")
        assert r.json()["model_version"].startswith(f"{run}/")
        assert r.json()["token_ids"] == _offline_greedy(find_policies(soups_run, run), weights, 8), run
    assert answers[0].json()["token_ids"] != answers[1].json()["token_ids"]
    # a preference of the other run is unknown to the default one
    r = _post(server, {"prompt": PROMPT, "preferences": {"P4B": 1.0}})
    assert r.status_code == 422 and "P4B" in r.text
    for bad in ("train-nope", "../soups"):
        r = requests.get(f"{server}/v1/preferences", headers={MODEL_ID_HEADER: bad}, timeout=60)
        assert r.status_code == 404, (bad, r.text)
        assert r.json()["detail"][0]["loc"] == ["header", MODEL_ID_HEADER], r.text


def test_greedy_tokens_equal_the_offline_merged_model(server, soups_run):
    policies = find_policies(soups_run, "train-demo")
    base, tokenizer = load_pretrained(policies.base_dir)
    adapters = {n: LoraAdapter.from_dir(p) for n, p in policies.adapters.items()}
    cases = [{"P1A": 1.0}, {"P1A": 0.5, "P2A": 0.5}, {"P1A": 0.2, "P2A": 0.3, "P3A": 0.5},
             {"P3A": 0.9, "P2A": 0.1}]
    with ThreadPoolExecutor(len(cases)) as pool:  # concurrent: the server batches different weights
        answers = list(pool.map(lambda w: _post(server, {"prompt": PROMPT, "preferences": w,
                                                         "max_new_tokens": 12}), cases))
    texts = set()
    for weights, r in zip(cases, answers):
        assert r.status_code == 200, r.text
        body = r.json()
        full = {n: weights.get(n, 0.0) for n in adapters}
        assert body["weights"] == pytest.approx(full)
        merged = copy.deepcopy(base)
        merged.load_state_dict(merge_lora_exact(base, adapters, full))
        expected = generate_ids(merged, tokenizer, [PROMPT], max_new_tokens=12, greedy=True)[0]
        assert body["token_ids"] == expected, weights
        assert body["text"] == tokenizer.decode(expected, skip_special_tokens=True).strip()
        texts.add(body["text"])
    assert len(texts) > 1  # different soups really answer differently


LONG_PROMPT = " ".join(["rivers"] * 60)  # 60 tokens > the server's 40


@pytest.mark.parametrize("body, field", [
    ({"prompt": PROMPT, "preferences": {"P9Z": 1.0}}, "preferences"),
    ({"prompt": PROMPT, "preferences": {"P1A": -0.5, "P2A": 1.5}}, "preferences"),
    ({"prompt": PROMPT, "preferences": {"P1A": "NaN"}}, "preferences"),
    ({"prompt": PROMPT, "preferences": {"P1A": float("inf")}}, "preferences"),
    ({"prompt": PROMPT, "preferences": {"P1A": 0.5, "P2A": 0.4}}, "preferences"),
    ({"prompt": PROMPT, "preferences": {"P1A": 0.0}, "normalize": True}, "preferences"),
    ({"prompt": PROMPT, "preferences": {}}, "preferences"),
    ({"prompt": "", "preferences": {"P1A": 1.0}}, "prompt"),
    ({"prompt": "   ", "preferences": {"P1A": 1.0}}, "prompt"),
    ({"prompt": LONG_PROMPT, "preferences": {"P1A": 1.0}}, "prompt"),
    ({"prompt": "x" * 9000, "preferences": {"P1A": 1.0}}, "prompt"),
    ({"preferences": {"P1A": 1.0}}, "prompt"),
    ({"prompt": PROMPT, "preferences": {"P1A": 1.0}, "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": PROMPT, "preferences": {"P1A": 1.0}, "max_new_tokens": 17}, "max_new_tokens"),
    ({"prompt": PROMPT, "preferences": {"P1A": 1.0}, "temperature": -0.1}, "temperature"),
    ({"prompt": PROMPT, "preferences": {"P1A": 1.0}, "temperature": 2.5}, "temperature"),
    ({"prompt": PROMPT, "preferences": {"P1A": 1.0}, "seed": -1}, "seed"),
    ({"prompt": PROMPT, "preferences": {"P1A": 1.0}, "top_k": 3}, "top_k"),
])
def test_invalid_input_is_a_422_naming_the_field(server, body, field):
    # json.dumps writes NaN / Infinity literals, which the server's JSON parser accepts
    r = _post(server, body)
    assert r.status_code == 422, (r.status_code, r.text)
    assert any(field in [str(x) for x in d["loc"]] for d in r.json()["detail"]), r.text


def test_normalize_rescales_the_weights(server):
    r = _post(server, {"prompt": PROMPT, "preferences": {"P1A": 2.0, "P2A": 6.0}, "normalize": True,
                       "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["weights"] == pytest.approx({"P1A": 0.25, "P2A": 0.75, "P3A": 0.0})


@pytest.mark.slow
def test_load_mixed_weights_no_5xx(server):
    """240 requests, 8 at a time, 12 weight vectors (some hot enough to be cached): all 200."""
    import random

    rng = random.Random(0)
    vectors = []
    for _ in range(12):
        raw = [rng.random() for _ in range(3)]
        vectors.append({n: x / sum(raw) for n, x in zip(["P1A", "P2A", "P3A"], raw)})
    bodies = [{"prompt": rng.choice([PROMPT, "how do stars work", "what about bees"]),
               "preferences": rng.choice(vectors), "max_new_tokens": rng.randint(1, 6),
               "temperature": rng.choice([0.0, 0.7]), "seed": i, "normalize": True} for i in range(240)]
    started = time.time()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda b: _post(server, b, timeout=300).status_code, bodies))
    assert len(codes) == 240 and all(c == 200 for c in codes), sorted(set(codes))
    assert time.time() - started < 300
    served = [_post(server, {"prompt": PROMPT, "preferences": vectors[0], "normalize": True,
                             "max_new_tokens": 2}).json()["served_by"] for _ in range(2)]
    assert "cache" in served  # a vector asked for many times is served by a materialized soup
