"""The Ray Serve app over HTTP on loopback: exact greedy soups, 422 for bad input, a bounded load test."""
from __future__ import annotations

import copy
import json
import socket
import time
from collections import Counter
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


EXTRA_RUNS = ("train-b", "train-c")  # with train-other: as many as a replica keeps loaded


@pytest.fixture(scope="module")
def soups_run(tmp_path_factory):
    """Runs in one output folder: the default (train-demo) and others, served multiplexed."""
    out = build_demo_run(tmp_path_factory.mktemp("soups"))
    build_demo_run(out, preferences=("P1A", "P4B"), seed=1, training_key="train-other")
    for i, key in enumerate(EXTRA_RUNS):
        build_demo_run(out, preferences=("P1A",), seed=2 + i, training_key=key)
    return out


@pytest.fixture(scope="module")
def server(ray_local, soups_run):
    from ray import serve

    from raypref.serve.app import serve_soups

    url = serve_soups(_args(soups_run), port=_free_port())
    _wait_healthy(url)
    yield url
    serve.shutdown()


def _args(soups_run, **extra):
    return {"output_dir": str(soups_run), "training_key": "train-demo", "max_new_tokens": 16, "max_prompt_tokens": 40,
            "cache_size": 2, "hot_after": 3, "torch_threads": 1, **extra}


def _wait_healthy(url):
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the soups server at {url} did not become healthy in 120 s")


def _extra_app(server, soups_run, name, deployment, **args):
    """Another app of the same run on the same Serve instance (at /<name>), with other limits."""
    from ray import serve

    from raypref.serve.app import SoupsServer

    deployment = {"ray_actor_options": {"num_cpus": 0}, **deployment}  # 2 test CPUs: do not wait for one
    serve.run(SoupsServer.options(**deployment).bind(_args(soups_run, **args)), name=name,
              route_prefix=f"/{name}", blocking=False)
    url = f"{server}/{name}"
    _wait_healthy(url)
    return url


def _post(url, body, timeout=120):
    return requests.post(f"{url}/v1/generate", data=json.dumps(body), timeout=timeout,
                         headers={"content-type": "application/json"})


def test_binds_loopback_and_describes_itself(server):
    assert server.startswith("http://127.0.0.1:")
    r = requests.get(f"{server}/v1/preferences", timeout=10)
    prefs = r.json()
    assert prefs["preferences"] == ["P1A", "P2A", "P3A"] and prefs["model_version"].startswith("train-demo/")
    assert prefs["run"] == "train-demo" and "run_dir" not in prefs and "base_dir" not in prefs
    assert "/tmp" not in r.text and "soups" not in r.text  # no server path of the run or its base
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
    for bad in ("train-nope", "../soups", ".", "sft"):
        r = requests.get(f"{server}/v1/preferences", headers={MODEL_ID_HEADER: bad}, timeout=60)
        assert r.status_code == 404, (bad, r.text)
        assert r.json()["detail"][0]["loc"] == ["header", MODEL_ID_HEADER], r.text
        # the body names no server path and no run (it named runs/ and every run before)
        assert str(soups_run) not in r.text and "train-" not in r.text and "/tmp" not in r.text, r.text


def test_a_bogus_run_id_unloads_no_loaded_run(server):
    """Serve's multiplexer unloads its least recently used run before it calls the loader: a
    bogus id, found bogus only by the loader, evicted a real run (a reload per bogus request)."""
    from raypref.serve.app import MAX_RUNS_PER_REPLICA, MODEL_ID_HEADER

    runs = ("train-other", *EXTRA_RUNS)
    assert len(runs) == MAX_RUNS_PER_REPLICA  # the replica is full: the next new id would evict

    def ask(run):
        return requests.post(f"{server}/v1/generate", json={"prompt": PROMPT, "preferences": {"P1A": 1.0},
                                                            "max_new_tokens": 1},
                             headers={MODEL_ID_HEADER: run}, timeout=60).status_code

    assert [ask(r) for r in runs] == [200] * len(runs)
    loads = requests.get(f"{server}/healthz", timeout=10).json()["run_loads"]
    for bogus in ("train-nope", "train-nope-2", "../train-other", "train-b/", "x" * 300):
        assert ask(bogus) == 404
    assert [ask(r) for r in runs] == [200] * len(runs)
    assert requests.get(f"{server}/healthz", timeout=10).json()["run_loads"] == loads  # nothing reloaded


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
    ({"prompt": PROMPT, "preferences": {"P1A": 1e308, "P2A": 1e308}, "normalize": True}, "preferences"),
    ({"prompt": PROMPT, "preferences": {"P1A": 1e308, "P2A": 1e308}}, "preferences"),
    ({"prompt": PROMPT, "preferences": {f"P{i}": 0.01 for i in range(100)}}, "preferences"),
])
def test_invalid_input_is_a_422_naming_the_field(server, body, field):
    # json.dumps writes NaN / Infinity literals, which the server's JSON parser accepts
    r = _post(server, body)
    assert r.status_code == 422, (r.status_code, r.text)
    assert any(field in [str(x) for x in d["loc"]] for d in r.json()["detail"]), r.text
    assert len(r.content) < 2000  # the refusal does not echo the request


def test_oversized_bodies_are_a_413_unread(server):
    """No body-size limit before: a 10,000-key preferences dict was parsed in full and echoed in a
    ~1 MB 422. Now bodies over MAX_BODY_BYTES are refused, with or without a content-length."""
    from raypref.serve.schema import MAX_BODY_BYTES

    many = {"prompt": PROMPT, "preferences": {f"key-{i:05d}": 0.0001 for i in range(10_000)}}
    r = _post(server, many)
    assert r.status_code == 413 and len(r.content) < 500, (r.status_code, len(r.content))
    chunks = (b'{"prompt": "' + b"a" * 16384 for _ in range(MAX_BODY_BYTES // 16384 + 2))  # chunked: no length
    r = requests.post(f"{server}/v1/generate", data=chunks, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413, r.status_code
    r = _post(server, {"prompt": PROMPT, "preferences": {"P1A": 1.0}, "max_new_tokens": 2})
    assert r.status_code == 200  # a normal body still passes the guard


@pytest.fixture(scope="module")
def batching_app(server, soups_run):
    """Waits up to 2 s to fill a batch of 8: concurrent requests are decoded together."""
    return _extra_app(server, soups_run, "batching", {"max_ongoing_requests": 16},
                      max_batch_size=8, batch_wait_timeout_s=2.0)


def test_a_hostile_request_in_a_batch_fails_none_of_the_others(batching_app, soups_run):
    """A temperature of 1e-40 made softmax NaN and ``torch.multinomial`` raise; ``@serve.batch``
    then gave that exception to every request of the batch (8 users' 500s). Now it decodes
    greedily, and the 7 good requests of its batch get exactly their offline greedy tokens."""
    rng_weights = [{"P1A": 1.0}, {"P2A": 1.0}, {"P3A": 1.0}, {"P1A": 0.5, "P2A": 0.5}, {"P2A": 0.5, "P3A": 0.5},
                   {"P1A": 0.2, "P2A": 0.3, "P3A": 0.5}, {"P1A": 0.7, "P3A": 0.3}]
    bodies = [{"prompt": PROMPT, "preferences": w, "max_new_tokens": 6} for w in rng_weights]
    hostile = {"prompt": PROMPT, "preferences": {"P1A": 0.4, "P2A": 0.6}, "max_new_tokens": 6,
               "temperature": 1e-40, "seed": 3}
    bodies.insert(3, hostile)
    with ThreadPoolExecutor(len(bodies)) as pool:  # 8 at once: one batch (it closes at 8)
        answers = list(pool.map(lambda b: _post(batching_app, b), bodies))
    assert [r.status_code for r in answers] == [200] * len(bodies), [r.text for r in answers]
    policies = find_policies(soups_run, "train-demo")
    for body, r in zip(bodies, answers):
        assert r.json()["token_ids"] == _offline_greedy(policies, body["preferences"], 6), body


TOKEN = "a-test-token-0123456789"


@pytest.fixture(scope="module")
def tight_app(server, soups_run, tmp_path_factory):
    """One request in flight and one queued per replica; a batch waits 1 s but a request only
    0.02 s, less than 100 sampled tokens take on any CPU; a bearer token."""
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    return _extra_app(server, soups_run, "tight", {"max_ongoing_requests": 1, "max_queued_requests": 1},
                      batch_wait_timeout_s=1.0, request_timeout_s=0.02, max_new_tokens=100,
                      auth_token_file=str(token_file))


def test_bearer_token_guards_every_route_but_health(tight_app):
    assert requests.get(f"{tight_app}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{tight_app}/v1/preferences", timeout=30).status_code == 401
    bad = requests.get(f"{tight_app}/v1/preferences", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
    ok = requests.get(f"{tight_app}/v1/preferences", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["run"] == "train-demo"


def test_overload_is_a_503_and_a_slow_request_a_504(tight_app):
    """The queue was unbounded and nothing timed out. Now, past max_ongoing + max_queued, Serve
    answers 503 at once; a request not answered within request_timeout_s gets 504."""
    # 100 sampled tokens: an admitted request cannot finish within the timeout, however fast the
    # machine (with 2 greedy tokens an idle machine answered one in time: a 200)
    body = {"prompt": PROMPT, "preferences": {"P1A": 1.0}, "max_new_tokens": 100, "temperature": 1.0, "seed": 0}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    started = time.time()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: requests.post(f"{tight_app}/v1/generate", json=body, headers=auth,
                                                      timeout=60).status_code, range(8)))
    assert set(codes) <= {503, 504} and 503 in codes and 504 in codes, codes
    assert time.time() - started < 30


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


# ------------------------------------------------------------ HTTP fuzzing (issue 21)

FUZZ_REQUESTS = 520


def _fuzz_cases():
    """(route, body bytes, run header): near-valid bodies with one adversarial field (so many reach
    the batch), structured bodies of junk, arbitrary JSON and bytes, on every route."""
    from hypothesis import strategies as st

    junk = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=12)
    tiny_and_huge = st.sampled_from([0.0, -0.0, 5e-324, 1e-320, 1e-40, 1e-38, 9.99e-4, 1e-3, 1.0, 2.0, 1e300, 1e308,
                                     float("inf"), float("nan"), -1e-40])
    names = st.sampled_from(["P1A", "P2A", "P3A", "P4B", ""]) | st.text(max_size=12)
    weight = tiny_and_huge | st.floats() | st.integers(-2**64, 2**64)
    valid = st.sampled_from([{"P1A": 1.0}, {"P1A": 0.5, "P2A": 0.5}, {"P1A": 0.2, "P2A": 0.3, "P3A": 0.5}])
    preferences = valid | st.dictionaries(names, weight, max_size=6) | junk
    prompts = st.sampled_from([PROMPT, "how do stars work", " ", ""]) | st.text(max_size=120)
    fields = {"prompt": prompts | junk, "preferences": preferences, "normalize": st.booleans() | junk,
              "max_new_tokens": st.integers(-3, 20) | st.integers(-2**70, 2**70) | junk,
              "temperature": tiny_and_huge | st.floats(0, 2.5) | junk,
              "seed": st.integers(-1, 2**31) | st.integers(-2**70, 2**70) | junk, "top_k": junk}
    one_field = st.sampled_from(sorted(fields)).flatmap(lambda k: fields[k].map(lambda v: {k: v}))
    base = st.fixed_dictionaries({"prompt": st.sampled_from([PROMPT, "how do stars work"]), "preferences": valid,
                                  "max_new_tokens": st.integers(1, 8)})
    near_valid = st.builds(lambda b, m: {**b, **m}, base, st.just({}) | one_field)
    chat_base = st.fixed_dictionaries({
        "model": st.just("train-demo"), "messages": st.just([{"role": "user", "content": PROMPT}]),
        "max_tokens": st.integers(1, 8), "temperature": st.just(0.0)})
    chat_fields = {"model": st.sampled_from(["train-other", ""]) | junk, "preferences": preferences,
                   "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "tool"]),
                                                               "content": prompts}), max_size=3) | junk,
                   "max_tokens": st.integers(-2, 20) | junk, "temperature": tiny_and_huge | junk,
                   "seed": st.integers(-1, 2**40), "stream": st.booleans() | junk, "n": st.integers(0, 3)}
    chat_field = st.sampled_from(sorted(chat_fields)).flatmap(lambda k: chat_fields[k].map(lambda v: {k: v}))
    chat = st.builds(lambda b, m: {**b, **m}, chat_base, st.just({}) | chat_field)
    encode = lambda b: json.dumps(b).encode()  # noqa: E731 - NaN / Infinity literals included
    routes = st.sampled_from(["/v1/generate", "/v1/chat/completions", "/v1/preferences", "/v1/models", "/healthz",
                              "/v1/nope"])
    case = (st.tuples(st.just("/v1/generate"), near_valid.map(encode))
            | st.tuples(st.just("/v1/generate"), st.fixed_dictionaries({}, optional=fields).map(encode))
            | st.tuples(st.just("/v1/chat/completions"), chat.map(encode))
            | st.tuples(routes, junk.map(encode) | st.binary(max_size=200)))
    header = st.none() | st.none() | st.sampled_from(["train-demo", "train-other", "..", "", "runs"]) | \
        st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40)
    return st.tuples(case, header)


def test_fuzzed_requests_never_get_a_5xx(server, soups_run):
    """Hypothesis-generated bodies, run ids and routes against the live app (loopback only): no
    answer is a 5xx and none names a server path. Derandomized, so CI runs the same cases."""
    from hypothesis import HealthCheck, given, settings

    from raypref.serve.app import MODEL_ID_HEADER

    assert server.startswith("http://127.0.0.1:")
    sent, session = [], requests.Session()

    @settings(max_examples=FUZZ_REQUESTS, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_fuzz_cases())
    def one(case):
        (route, body), run = case
        headers = {"content-type": "application/json", **({MODEL_ID_HEADER: run} if run is not None else {})}
        method = session.post if route in ("/v1/generate", "/v1/chat/completions") else session.get
        r = method(f"{server}{route}", data=body, headers=headers, timeout=60)
        sent.append((route, r.status_code))
        assert r.status_code < 500, (route, body[:300], run, r.status_code, r.text[:500])
        assert str(soups_run) not in r.text

    started = time.time()
    one()
    elapsed = time.time() - started
    codes = Counter(sent)
    assert len(sent) >= 500 and codes[("/v1/generate", 422)] and codes[("/v1/chat/completions", 422)], codes
    assert codes[("/v1/generate", 200)] >= 20 and codes[("/v1/chat/completions", 200)] >= 5, codes  # generated
    # a wall-clock bound here failed under load (153 s beside a training run): a hang is caught by
    # each request's timeout instead, and the time is printed for the CI log
    print(f"[fuzz] {len(sent)} requests in {elapsed:.0f} s")


# ------------------------------------------------------------ OpenAI-compatible endpoint (issue 19)


def test_openai_client_chat_completion_equals_generate_for_the_same_soup(server, soups_run):
    """The ``openai`` client against the local server: a chat completion with preference weights
    (extra body) gives the same greedy tokens as /v1/generate and the offline merged soup;
    streamed, the same text; /v1/models lists the runs."""
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)
    assert {m.id for m in client.models.list()} == {"train-demo", "train-other", *EXTRA_RUNS}
    weights = {"P1A": 0.3, "P2A": 0.7}
    chat = client.chat.completions.create(
        model="train-demo", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}],
        max_tokens=8, temperature=0, seed=1, extra_body={"preferences": weights})
    generated = _post(server, {"prompt": PROMPT, "preferences": weights, "max_new_tokens": 8}).json()
    extra = chat.model_extra["raypref"]
    assert extra["token_ids"] == generated["token_ids"] == _offline_greedy(find_policies(soups_run, "train-demo"),
                                                                           weights, 8)
    assert chat.choices[0].message.content == generated["text"] and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens == 8
    assert extra["weights"] == pytest.approx({"P1A": 0.3, "P2A": 0.7, "P3A": 0.0})

    stream = client.chat.completions.create(model="train-demo", messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=8, temperature=0, stream=True,
                                            extra_body={"preferences": weights})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == generated["text"]
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    # the other run through the multiplexing header; a run the header does not pick is a 404
    other = client.chat.completions.create(model="train-other", messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=4, temperature=0, extra_body={"preferences": {"P4B": 1.0}},
                                           extra_headers={"serve_multiplexed_model_id": "train-other"})
    assert other.model == "train-other"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="train-other", messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError):  # unknown preference: the same 422 as /v1/generate
        client.chat.completions.create(model="train-demo", messages=[{"role": "user", "content": PROMPT}],
                                       extra_body={"preferences": {"P9Z": 1.0}})
    with pytest.raises(openai.UnprocessableEntityError):  # no user message
        client.chat.completions.create(model="train-demo", messages=[{"role": "system", "content": "hi"}])
