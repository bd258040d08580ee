"""Per-request soups without Ray: hooks equal the merged model; the cache and sampling behave."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from raypref.models.factory import generate_ids
from raypref.models.merge import LoraAdapter, merge_lora_exact, merge_lora_into
from raypref.serve.demo import build_demo_run
from raypref.serve.engine import GenerationRequest, SoupEngine
from raypref.serve.policies import PolicyDiscoveryError, find_policies
from raypref.serve.soup_model import SoupForward

PROMPTS = ["what is a good way to learn about rivers", "tell me about stars", "how do bees work"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    run = build_demo_run(tmp_path_factory.mktemp("soups"))
    return SoupEngine.from_policies(find_policies(run), cache_size=1, hot_after=2)


def _offline(engine, weights, prompt, n):
    merged = merge_lora_into(copy.deepcopy(engine._base), engine._base, engine._adapters,
                             dict(zip(engine.names, weights)))
    return generate_ids(merged, engine.tokenizer, [prompt], max_new_tokens=n, greedy=True)[0]


def test_batch_of_different_soups_gives_each_offline_merge_greedy_tokens(engine):
    weights = [(1 / 3, 1 / 3, 1 / 3), (1.0, 0.0, 0.0), (0.1, 0.6, 0.3)]
    got = engine.generate([GenerationRequest(p, w, 10, 0.0, 0) for p, w in zip(PROMPTS, weights)])
    for p, w, r in zip(PROMPTS, weights, got):
        assert r.served_by == "soup"
        assert r.token_ids == _offline(engine, w, p, 10)
    base = generate_ids(engine._base, engine.tokenizer, PROMPTS[:1], max_new_tokens=10, greedy=True)[0]
    assert got[0].token_ids != base  # the adapters really change the output


def test_hot_weights_are_materialized_and_give_the_same_tokens(engine):
    w = (0.2, 0.2, 0.6)
    req = [GenerationRequest(PROMPTS[1], w, 8, 0.0, 0)]
    first = engine.generate(req)[0]
    second = engine.generate(req)[0]  # second ask: hot -> materialized after this batch
    third = engine.generate(req)[0]
    assert (first.served_by, second.served_by, third.served_by) == ("soup", "soup", "cache")
    assert first.token_ids == third.token_ids == _offline(engine, w, PROMPTS[1], 8)
    other = (0.5, 0.5, 0.0)  # cache_size 1: a new hot vector recycles the buffer
    for _ in range(3):
        out = engine.generate([GenerationRequest(PROMPTS[1], other, 8, 0.0, 0)])[0]
    assert out.served_by == "cache" and engine.cached() == [other]
    assert out.token_ids == _offline(engine, other, PROMPTS[1], 8)


def test_sampling_is_seeded_per_row_whatever_the_batch(engine):
    w = (0.3, 0.3, 0.4)
    alone = engine.generate([GenerationRequest(PROMPTS[2], w, 12, 1.0, 7)])[0]
    mixed = engine.generate([GenerationRequest(PROMPTS[0], (1.0, 0.0, 0.0), 5, 0.0, 1),
                             GenerationRequest(PROMPTS[2], w, 12, 1.0, 7)])[1]
    assert alone.token_ids == mixed.token_ids
    other_seed = engine.generate([GenerationRequest(PROMPTS[2], w, 12, 1.0, 8)])[0]
    assert other_seed.token_ids != alone.token_ids


def _lora(model, cfg, seed):
    m = get_peft_model(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return LoraAdapter.from_peft_model(m)


@pytest.mark.parametrize("fold_budget", [0, 16 << 20])  # per-row scales applied per step / folded once
@pytest.mark.parametrize("arch", ["gpt2_tied", "llama_tied", "llama_untied"])
def test_hooked_forward_equals_merged_model_with_tied_embeddings(arch, fold_budget):
    """Adapters on the embedding too: the hook must also move the tied output head."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2_tied":
        base = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
        targets = ["c_attn", "c_proj", "wte"]
    else:
        base = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                            tie_word_embeddings=arch == "llama_tied")).eval()
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"]
    adapters = {n: _lora(base, LoraConfig(r=2, lora_alpha=4, target_modules=targets), s)
                for n, s in (("a", 1), ("b", 2))}
    soup = SoupForward(copy.deepcopy(base), adapters, fold_budget_bytes=fold_budget)
    ids = torch.tensor([[3, 5, 7, 9], [2, 4, 6, 8]])
    rows = torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    with soup.weights(rows) as model, torch.no_grad():
        got = model(ids).logits
    for b in range(2):
        merged = copy.deepcopy(base)
        merged.load_state_dict(merge_lora_exact(base, adapters, dict(zip("ab", rows[b].tolist()))))
        with torch.no_grad():
            assert torch.allclose(got[b], merged(ids[b:b + 1]).logits[0], atol=1e-5)
    with torch.no_grad():  # outside the block: the bare base
        assert torch.allclose(soup.model(ids).logits, base(ids).logits)


def test_discovery_errors_name_the_folder(tmp_path):
    with pytest.raises(PolicyDiscoveryError, match="no runs/ folder"):
        find_policies(tmp_path)
    (tmp_path / "runs" / "train-x").mkdir(parents=True)
    with pytest.raises(PolicyDiscoveryError, match="no finished policy"):
        find_policies(tmp_path)


def test_prompt_lengths_asked_during_a_batch_do_not_break_its_padding(engine):
    """The app measures each request's prompt (validation) while another batch encodes with
    padding: a fast tokenizer's padding state is shared, and unguarded this made a batch's rows
    ragged ("Unable to create tensor", a 500 in the load test)."""
    import threading

    stop, errors = threading.Event(), []

    def measure():
        try:
            while not stop.is_set():
                engine.prompt_length("tell me about rivers and how they reach the sea")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=measure)
    thread.start()
    try:
        # many prompts of many lengths: a long padded encode, a wide window for the other thread
        prompts = [" ".join(["tell me about rivers"] * (1 + i % 7)) for i in range(64)]
        for i in range(20):
            out = engine.generate([GenerationRequest(p, (0.2, 0.3, 0.5), 1, 0.0, i) for p in prompts])
            assert len(out) == len(prompts)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors


# ------------------------------------------------------------ hostile input (issue 21), no Ray


def test_a_temperature_below_the_floor_is_greedy_not_a_nan_failure(engine):
    """A temperature in (0, ~1e-37] overflowed logits / T, softmax gave NaN and sampling raised
    (failing the whole batch); below GREEDY_BELOW_TEMPERATURE it now decodes greedily."""
    w = (0.2, 0.5, 0.3)
    greedy = engine.generate([GenerationRequest(PROMPTS[0], w, 10, 0.0, 0)])[0]
    for t in (1e-40, 5e-324, 1e-20, 0.0009):
        got = engine.generate([GenerationRequest(PROMPTS[0], w, 10, t, 3)])[0]
        assert got.token_ids == greedy.token_ids, t


def test_a_failing_row_gets_its_own_error_and_the_batch_its_results(engine, monkeypatch):
    """Generation failures are isolated per row: the group fails, each row is retried alone, the
    failing one gets a GenerationError in its place and the others their usual tokens."""
    from raypref.serve.engine import GenerationError

    decode = engine._decode

    def hostile(model, batch):
        if any(r.prompt == "boom" for r in batch):
            raise FloatingPointError("a hostile row")
        return decode(model, batch)

    monkeypatch.setattr(engine, "_decode", hostile)
    weights = [(1.0, 0.0, 0.0), (0.1, 0.6, 0.3), (0.3, 0.3, 0.4)]
    reqs = [GenerationRequest(PROMPTS[0], weights[0], 8, 0.0, 0), GenerationRequest("boom", weights[1], 8, 0.0, 0),
            GenerationRequest(PROMPTS[2], weights[2], 8, 0.0, 0)]
    out = engine.generate(reqs)
    assert isinstance(out[1], GenerationError) and "FloatingPointError" in str(out[1])
    for i in (0, 2):
        assert out[i].token_ids == _offline(engine, weights[i], reqs[i].prompt, 8)


def test_request_counts_per_weight_vector_are_bounded(engine, monkeypatch):
    """``_asked`` grew one entry per distinct weight vector forever; now the least recently asked
    are dropped past ASKED_LIMIT, and a vector asked for often still becomes hot."""
    import raypref.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "ASKED_LIMIT", 8)
    hot = (0.7, 0.2, 0.1)
    for i in range(40):
        w = (i / 1000, 0.5, 0.5 - i / 1000)
        out = engine.generate([GenerationRequest(PROMPTS[1], w, 1, 0.0, 0), GenerationRequest(PROMPTS[1], hot, 1, 0.0, 0)])
        assert len(engine._asked) <= 8
    assert out[1].served_by == "cache" and hot in engine.cached()


def test_weights_that_overflow_their_sum_are_a_422_not_an_overflow(engine):
    """``math.fsum`` of {1e308, 1e308} raised OverflowError (a 500); now an InvalidField (422)."""
    from raypref.serve.schema import GenerateRequest, InvalidField, soup_weights

    for normalize in (True, False):
        req = GenerateRequest(prompt="x", preferences={"P1A": 1e308, "P2A": 1e308}, normalize=normalize)
        with pytest.raises(InvalidField, match="too large"):
            soup_weights(req, engine.names)
    huge = GenerateRequest(prompt="x", preferences={"P1A": 1e308, "P2A": 5e-324}, normalize=True)
    assert soup_weights(huge, engine.names) == pytest.approx((1.0, 0.0, 0.0))


def test_a_request_with_too_many_preference_keys_is_refused_by_the_schema():
    from pydantic import ValidationError

    from raypref.serve.schema import MAX_PREFERENCE_KEYS, GenerateRequest

    with pytest.raises(ValidationError, match="preferences"):
        GenerateRequest(prompt="x", preferences={f"k{i}": 0.0 for i in range(MAX_PREFERENCE_KEYS + 1)})


def test_start_up_refuses_runs_times_copies_beyond_free_memory(tmp_path):
    """Each replica may hold 1 + MAX_RUNS_PER_REPLICA runs x (base + soup + cache_size copies):
    checked at start-up against free memory (here: a given figure, and a cache_size no machine has)."""
    from raypref.serve.app import MAX_RUNS_PER_REPLICA, check_memory, prepare

    run = build_demo_run(tmp_path / "soups")
    policies = find_policies(run)
    needed = check_memory(policies, 4, available=1 << 40)
    base = sum(f.stat().st_size for f in policies.base_dir.glob("*.safetensors"))
    assert needed >= (1 + MAX_RUNS_PER_REPLICA) * 6 * base
    with pytest.raises(MemoryError, match="cache_size=4"):
        check_memory(policies, 4, available=needed - 1)
    with pytest.raises(MemoryError, match="lower cache_size"):
        prepare({"output_dir": str(run), "cache_size": 10**9})


def test_binding_beyond_loopback_needs_an_explicit_flag(tmp_path, capsys):
    from raypref.serve.app import check_bind, serve_soups

    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, allow_remote=False, auth_token_file=None)
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.org"):
        with pytest.raises(ValueError, match="allow_remote"):
            check_bind(host, allow_remote=False, auth_token_file=None)
    check_bind("0.0.0.0", allow_remote=True, auth_token_file=None)
    assert "WITHOUT authentication" in capsys.readouterr().err
    run = build_demo_run(tmp_path / "soups")
    with pytest.raises(ValueError, match="refusing to bind '0.0.0.0'"):  # before Serve starts
        serve_soups({"output_dir": str(run)}, host="0.0.0.0")


@pytest.mark.timeout(120)
def test_jobs_serve_refuses_a_public_host_before_starting_ray(tmp_path):
    """The old job bound 0.0.0.0 without a word (and then served forever: hence the timeout)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    try:
        from serve import main
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit, match="--allow-remote"):
        main(["--demo", str(tmp_path / "demo"), "--host", "0.0.0.0"])
    token = tmp_path / "token"
    token.write_text("short")
    with pytest.raises(SystemExit, match="at least 16 characters"):
        main(["--demo", str(tmp_path / "demo"), "--auth-token-file", str(token)])


def test_a_run_is_found_and_hashed_off_the_event_loop(tmp_path, monkeypatch):
    """Loading a multiplexed run hashes its weight files (``_content_hash``): that ran on the
    replica's event loop and stalled every request meanwhile."""
    import asyncio

    import raypref.serve.policies as policies_module
    from raypref.serve.app import ServerArgs, SoupsServer

    run = build_demo_run(tmp_path / "soups")
    build_demo_run(run, preferences=("P1A",), seed=1, training_key="train-other")
    on_loop = []
    real_hash = policies_module._content_hash

    def spy(paths):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real_hash(paths)

    monkeypatch.setattr(policies_module, "_content_hash", spy)
    cls = SoupsServer.func_or_class
    server = cls.__new__(cls)
    server.args, server.output_dir, server.run_loads = ServerArgs(output_dir=str(run)), run, 0
    policies, engine = asyncio.run(cls._load_run.__wrapped__(server, "train-other"))
    assert policies.run_dir.name == "train-other" and engine.names == ["P1A"]
    assert on_loop == [False]


def _asgi_call(app, path, body=b"", headers=(), chunk=None, root_path=""):
    """One HTTP request through an ASGI app without a server: (status, body)."""
    import asyncio

    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": root_path + path, "root_path": root_path,
             "headers": list(headers), "query_string": b""}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_request_guard_checks_the_token_and_the_body_size(monkeypatch):
    """The guard in front of every route, without Ray: 401 without the token (but /healthz),
    413 for a body over the limit whether or not it has a content-length, the body replayed
    whole to the app otherwise."""
    from raypref.serve import guard
    from raypref.serve.schema import MAX_BODY_BYTES

    async def echo(scope, receive, send):
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": message["body"]})

    app = guard.RequestGuard(echo)
    monkeypatch.setattr(guard, "_token", None)
    assert _asgi_call(app, "/v1/generate", b"abc" * 100, chunk=7) == (200, b"abc" * 100)
    big = b"x" * (MAX_BODY_BYTES + 1)
    assert _asgi_call(app, "/v1/generate", big, [(b"content-length", str(len(big)).encode())])[0] == 413
    assert _asgi_call(app, "/v1/generate", big, chunk=4096)[0] == 413  # chunked: no length given
    assert _asgi_call(app, "/v1/generate", b"", [(b"content-length", b"-1")])[0] == 400
    monkeypatch.setattr(guard, "_token", "t" * 20)
    assert _asgi_call(app, "/v1/generate", b"{}")[0] == 401
    assert _asgi_call(app, "/v1/generate", b"{}", [(b"authorization", b"Bearer nope")])[0] == 401
    assert _asgi_call(app, "/v1/generate", b"{}", [(b"authorization", b"Bearer " + b"t" * 20)]) == (200, b"{}")
    assert _asgi_call(app, "/healthz")[0] == 200
    assert _asgi_call(app, "/healthz", root_path="/tight")[0] == 200  # an app under a route prefix
    assert _asgi_call(app, "/v1/generate", root_path="/healthz")[0] == 401
