"""The simulated world: determinism, judges, difficulty, simulated choices, SFT corpus."""
import time

import numpy as np
import pytest

from raypref.data.users import psoups_profiles, two_user_conflict, ultrafeedback_random
from raypref.data.world import ASPECTS, ATTRIBUTES, World


@pytest.fixture(scope="module")
def world():
    return World(seed=0, difficulty=0.0)


def rng(seed=0):
    return np.random.default_rng(seed)


def test_same_seed_gives_same_data_and_other_seed_differs():
    user = ultrafeedback_random(0)[3]
    rows = [[r.to_row() for r in World(7, 0.3).pairs_for_user(user, 50, rng(1))] for _ in range(2)]
    assert rows[0] == rows[1]
    assert World(7, 0.3).prompts(20) == World(7, 0.3).prompts(20)
    assert World(8, 0.3).prompts(20) != World(7, 0.3).prompts(20)
    assert [r.to_row() for r in World(7, 0.3).pairs_for_user(user, 50, rng(2))] != rows[0]


def test_train_and_test_prompts_are_disjoint_and_cover_the_topics(world):
    train, test = set(world.prompt_pool("train")), set(world.prompt_pool("test"))
    assert train and test and not train & test
    assert {world.topic_of(p) for p in test} == set(world.topics)
    assert len(world.prompts(1000, "test")) == 1000  # cycles past the pool
    with pytest.raises(ValueError, match="split"):
        world.prompts(3, "validation")


def test_vocabulary_covers_every_generated_token(world):
    vocab = set(world.vocabulary())
    assert 200 <= len(vocab) <= 600
    texts = [p + " " + r for p, r in world.sft_corpus(500, rng())]
    texts += [r.prompt + " " + r.chosen + " " + r.rejected
              for p in psoups_profiles() for r in world.pairs_for_preference(p.name, 30, rng())]
    texts += [r.user_text for r in world.pairs_for_preference("P3B", 2, rng())]
    tokens = {t for text in texts for t in text.split(" ")}
    assert tokens <= vocab, sorted(tokens - vocab)
    assert all(t == t.lower() and t for t in tokens)  # lowercase, single spaces


def test_judges_read_the_latent_attributes_back_at_difficulty_zero(world):
    g = rng(3)
    for prompt in world.prompts(300):
        response = world.sample_response(prompt, g)
        judged = world.judge(response.text)
        for name in ("expertise", "style") + ASPECTS:
            assert judged[name] == pytest.approx(response.latent[name]), (name, response.text)


def _latent_and_judged(world, n=600):
    g, latent, judged = rng(7), [], []
    for prompt in world.prompts(n):
        response = world.sample_response(prompt, g)
        latent.append(response.latent)
        judged.append(world.judge(response.text))
    return latent, judged


def _corr(latent, judged, name):
    return np.corrcoef([l[name] for l in latent], [j[name] for j in judged])[0, 1]


def test_aspects_show_weakly_at_high_difficulty():
    latent, judged = _latent_and_judged(World(0, 0.8, attribute_noise=0.0))
    for aspect in ASPECTS:
        assert 0.1 < _corr(latent, judged, aspect) < 0.6, aspect
    for name in ("expertise", "style"):  # attribute_noise=0 keeps them exact
        assert all(l[name] == pytest.approx(j[name]) for l, j in zip(latent, judged))


def test_difficulty_blurs_the_psoups_attributes_in_the_text():
    for difficulty in (0.0, 0.8):
        latent, judged = _latent_and_judged(World(0, difficulty))
        for name in ("verbosity", "expertise", "style"):
            corr = _corr(latent, judged, name)
            if difficulty == 0.0:
                assert corr > 0.97, (name, corr)
            else:  # 40% of responses show a random level: still learnable, not exact
                assert 0.35 < corr < 0.85, (name, corr)


def _judge_with(world, attrs, attribute, n=40, prompt="tell me about bees ."):
    g = rng(4)
    return np.array([world.judge(world.sample_response(prompt, g, attrs).text, prompt)[attribute]
                     for _ in range(n)])


def test_each_judge_moves_with_its_attribute(world):
    long, short = _judge_with(world, {"verbosity": 1.0}, "verbosity"), \
        _judge_with(world, {"verbosity": 0.0}, "verbosity")
    assert long.min() > short.max()
    levels = [_judge_with(world, {"verbosity": v}, "verbosity").mean() for v in (0, .2, .4, .6, .8, 1)]
    assert np.all(np.diff(levels) > 0)
    assert _judge_with(world, {"expertise": 1.0}, "expertise").min() == 1.0
    assert _judge_with(world, {"expertise": 0.0}, "expertise").max() == 0.0
    assert _judge_with(world, {"style": 1.0}, "style").min() == 1.0
    assert _judge_with(world, {"style": -1.0}, "style").max() == -1.0
    for aspect in ASPECTS:
        high = _judge_with(world, {aspect: 5}, aspect)
        low = _judge_with(world, {aspect: 1}, aspect)
        assert high.min() > low.max(), aspect


def test_judges_on_hand_written_text(world):
    assert world.judge("bees have six legs .")["truthfulness"] > 3 > \
        world.judge("bees have eight legs .")["truthfulness"]
    assert world.judge("hi friend ! great question .")["style"] > 0 > \
        world.judge("ugh , whatever , fine .")["style"]
    assert world.judge("bees involve pollination and pheromones .")["expertise"] > \
        world.judge("bees involve honey and flowers .")["expertise"]
    on, off = "bees involve honey and flowers .", "rockets involve space and moon ."
    prompt = "tell me about bees ."
    assert world.judge(on, prompt)["instruction_following"] > \
        world.judge(off, prompt)["instruction_following"]


def test_judges_never_crash_on_token_soup(world):
    vocab = world.vocabulary()
    g = rng(5)
    soups = ["", "   ", "<unk> zzz 123 !!", "bees bees bees bees", "\n\t"]
    soups += [" ".join(g.choice(vocab, size=int(g.integers(1, 200)))) for _ in range(200)]
    for text in soups:
        scores = world.judge(text, "how do stars work ?")
        assert set(scores) == set(ATTRIBUTES)
        assert 0 <= scores["verbosity"] <= 1 and 0 <= scores["expertise"] <= 1
        assert -1 <= scores["style"] <= 1
        assert all(1 <= scores[a] <= 5 for a in ASPECTS)
    assert world.judge("", None)["verbosity"] == 0.0


def test_bad_inputs_raise_clear_errors(world):
    with pytest.raises(ValueError, match="difficulty"):
        World(0, 1.5)
    with pytest.raises(ValueError, match="unknown attribute"):
        world.sample_response("tell me about bees .", rng(), {"humour": 1})
    with pytest.raises(ValueError, match="honesty"):
        world.sample_response("tell me about bees .", rng(), {"honesty": 9})
    with pytest.raises(ValueError, match="no topic"):
        world.sample_response("tell me about dragons .", rng())
    with pytest.raises(ValueError, match="unknown P-Soups"):
        world.pairs_for_preference("P9Z", 3, rng())


def _bag_of_words_accuracy(world, train, test, g):
    """Linear Bradley-Terry on bag-of-words differences, numpy gradient descent."""
    index = {t: i for i, t in enumerate(world.vocabulary())}

    def features(records):
        x = np.zeros((len(records), len(index)))
        for k, r in enumerate(records):
            for t in r.chosen.split():
                x[k, index[t]] += 1
            for t in r.rejected.split():
                x[k, index[t]] -= 1
        y = np.ones(len(records))
        swap = g.random(len(records)) < 0.5
        x[swap] *= -1
        y[swap] = 0
        return x, y

    x, y = features(train)
    w = np.zeros(x.shape[1])
    for _ in range(300):
        p = 1 / (1 + np.exp(-x @ w))
        w -= 0.5 * (x.T @ (p - y) / len(y) + 1e-4 * w)
    xt, yt = features(test)
    return float(np.mean((xt @ w > 0) == yt))


def test_simple_model_separates_opposed_users_only_when_the_world_is_easy():
    accuracy = {}
    for difficulty in (0.0, 0.8):
        world, g = World(0, difficulty), rng(1)
        helpful, honest = two_user_conflict()
        accs = []
        for user, other in ((helpful, honest), (honest, helpful)):
            train = world.pairs_for_user(user, 600, g, require_conflict_with=other)
            test = world.pairs_for_user(user, 300, g, require_conflict_with=other, split="test")
            accs.append(_bag_of_words_accuracy(world, train, test, g))
        accuracy[difficulty] = min(accs)
    assert accuracy[0.0] >= 0.97
    assert accuracy[0.8] <= accuracy[0.0] - 0.2


@pytest.mark.parametrize("difficulty", [0.0, 0.8])
def test_label_noise_grows_with_difficulty(difficulty):
    user = ultrafeedback_random(0)[0]
    records = World(0, difficulty).pairs_for_user(user, 3000, rng(2))
    margins = np.array([user.utility(r.chosen_scores) - user.utility(r.rejected_scores)
                        for r in records])
    assert np.all(margins != 0)  # exact ties are skipped
    assert np.mean(margins < 0) == pytest.approx(0.25 * difficulty, abs=0.03)


def test_conflict_pairs_are_ordered_oppositely_by_the_two_users(world):
    helpful, honest = two_user_conflict()
    records = world.pairs_for_user(helpful, 300, rng(), require_conflict_with=honest)
    assert len(records) == 300
    for r in records:
        assert r.chosen_scores["helpfulness"] > r.rejected_scores["helpfulness"]
        assert r.chosen_scores["honesty"] < r.rejected_scores["honesty"]
        assert r.user_id == helpful.user_id


def test_pairs_for_preference_chosen_is_better_on_its_dimension_per_the_judge(world):
    for user_id, profile in enumerate(psoups_profiles(), start=1):
        records = world.pairs_for_preference(profile.name, 100, rng(user_id))
        assert {r.user_id for r in records} == {user_id}
        assert {r.user_text for r in records} == {profile.instruction}
        for r in records:
            margin = (world.judge(r.chosen, r.prompt)[profile.attribute]
                      - world.judge(r.rejected, r.prompt)[profile.attribute])
            assert margin * profile.direction > 0.2, (profile.name, r.chosen, r.rejected)


def test_sft_corpus_mixes_attributes_and_follows_written_instructions(world):
    corpus = world.sft_corpus(1500, rng(6))
    profiles = psoups_profiles()
    instructed = [(p, r) for p, r in corpus if "generate" in p.split()]
    assert 0.22 < len(instructed) / len(corpus) < 0.38
    verbosity = np.array([world.judge(r)["verbosity"] for _, r in corpus])
    assert verbosity.std() > 0.2  # a diverse mixture, not one length
    for profile in profiles:
        judged = [world.judge(r)[profile.attribute] for p, r in instructed
                  if profile.instruction in p]
        others = [world.judge(r)[profile.attribute] for p, r in corpus if "generate" not in p]
        assert len(judged) > 20
        assert (np.mean(judged) - np.mean(others)) * profile.direction > 0.2, profile.name


def test_preference_instruction_joins_profile_texts(world):
    text = world.preference_instruction(["P1A", "P3B"])
    assert "elementary" in text.split() and "unfriendly" in text.split()
    assert set(text.split()) <= set(world.vocabulary())


def test_ten_thousand_pairs_are_fast(world):
    start = time.perf_counter()
    records = world.pairs_for_user(ultrafeedback_random(0)[0], 10_000, rng())
    assert len(records) == 10_000
    assert time.perf_counter() - start < 8.0  # ~1 s on a quiet core
