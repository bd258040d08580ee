"""The shared candidate pool (recipes/pool.py) and the reward data read from it (reward_data.pool_pairs)."""
import dataclasses
import json

import numpy as np
import pytest

from raypref.data.users import User
from raypref.recipes import pool as pool_mod
from raypref.recipes.pool import PARTIAL_FILE, POOL_FILE, PoolConfig, generate_pool, pool_folder

# hand-made answers, one per system prompt: (words, friendliness) orders are known
TEXTS = {
    "": "Water boils at one hundred degrees.",
    "long": ("Water boils at one hundred degrees Celsius at sea level, where the air above the pot "
             "weighs on the surface of the liquid, and on a high mountain it boils at a cooler "
             "temperature because the air there is thinner."),
    "friendly": "Great question, I love it! Water boils at a hundred degrees. Happy to help!",
    "unfriendly": "Ugh, what a stupid question. Water boils at a hundred degrees, obviously. "
                  "Stop wasting my time.",
}
ATTRS = ["verbosity", "expertise", "friendliness"]
# each judge's order of the answers (by system prompt), best first; tied answers share a rank
RANKS = {"verbosity": {"long": 0, "unfriendly": 1, "friendly": 2, "": 3},
         "friendliness": {"friendly": 0, "": 1, "long": 1, "unfriendly": 2},
         "expertise": {"long": 0, "unfriendly": 1, "": 2, "friendly": 3}}


def fake_model(tmp_path, content=b"weights"):
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(content)
    return str(folder)


def config(tmp_path, **kw):
    base = dict(model=fake_model(tmp_path), train_prompts=3, test_prompts=2, systems=list(TEXTS),
                batch_size=5, judges=ATTRS, dir=str(tmp_path / "pools"))
    return PoolConfig(**{**base, **kw})


class FakeLM:
    """Answers by system prompt; counts calls; raises on call number ``fail_at``."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, prompts, systems, seed):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        return [(TEXTS[s or ""] + ("" if s else f" ({seed})"), 7) for s in systems]


def test_pool_key_changes_with_every_setting(tmp_path):
    cfg = config(tmp_path)
    base = pool_folder(cfg)
    changes = dict(prompts=str(tmp_path / "q.txt"), train_prompts=2, test_prompts=1,
                   systems=["", "long"], samples_per_prompt=2, max_new_tokens=32,
                   temperature=0.7, seed=1, batch_size=4)
    (tmp_path / "q.txt").write_text("\n".join(f"Question number {i}?" for i in range(40)))
    keys = {base}
    for name, value in changes.items():
        keys.add(pool_folder(dataclasses.replace(cfg, **{name: value})))
    assert len(keys) == len(changes) + 1
    # the judges and the thread count are not generation settings: the same pool
    assert pool_folder(dataclasses.replace(cfg, judges=["verbosity"], threads=1)) == base
    # new weights under the same folder name are a new pool
    fake_model(tmp_path, b"other weights")
    assert pool_folder(cfg) != base


def test_killed_generation_resumes_by_batch_and_matches_an_uninterrupted_one(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        generate_pool(cfg, FakeLM(fail_at=3), log=lambda *a, **k: None)
    folder = pool_folder(cfg)
    partial = folder / PARTIAL_FILE
    assert len(partial.read_text().splitlines()) == 2 and not (folder / POOL_FILE).exists()
    with open(partial, "a") as f:
        f.write('{"batch": 2, "rows": [{"prompt": 0, "sys')  # a write torn by the kill
    lines = []
    lm = FakeLM()
    pool = generate_pool(cfg, lm, log=lambda *a, **k: lines.append(a[0]))
    n_items = 5 * len(TEXTS)
    assert lm.calls == -(-n_items // cfg.batch_size) - 2  # only the missing batches
    assert "resuming" in lines[0] and "tokens/s" in lines[-1] and "ETA" in lines[-1]
    assert not partial.exists() and len(pool.candidates) == n_items
    whole = generate_pool(dataclasses.replace(cfg, dir=str(tmp_path / "again")), FakeLM(), log=lambda *a, **k: None)
    assert pool.candidates == whole.candidates
    # a complete pool is read, never generated again
    again = generate_pool(cfg, FakeLM(fail_at=1), log=lambda *a, **k: None)
    assert again.candidates == pool.candidates
    assert [c.prompt for c in pool.candidates] == sorted(c.prompt for c in pool.candidates)


def test_broken_line_before_the_last_is_an_error_not_a_silent_drop(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        generate_pool(cfg, FakeLM(fail_at=3), log=lambda *a, **k: None)
    partial = pool_folder(cfg) / PARTIAL_FILE
    lines = partial.read_text().splitlines()
    partial.write_text(lines[0][:20] + "\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="partial.jsonl:1: a broken line"):
        generate_pool(cfg, FakeLM(), log=lambda *a, **k: None)


def judged_pool(tmp_path, **kw):
    cfg = config(tmp_path, **kw)
    return cfg, pool_mod.ensure_pool(cfg, FakeLM(), log=lambda *a, **k: None)


def test_text_judges_label_for_a_users_weights(tmp_path):
    from raypref.recipes.reward_data import _pool_user_pairs, pool_scores, RewardDataConfig

    cfg, pool = judged_pool(tmp_path)
    assert json.loads((pool.folder / "scores.json").read_text())["judges"] == ATTRS
    _, scaled = pool_scores(RewardDataConfig(source="pool", pool=cfg))
    zeros = {a: 0.0 for a in ATTRS}
    def system(text):
        return next(s for s, t in TEXTS.items() if text.startswith(t))

    for attr, ranks in RANKS.items():
        for sign in (1.0, -1.0):
            user = User(1, {**zeros, attr: sign})
            records = _pool_user_pairs(pool, scaled, user, None, "train", 9, 0.0, np.random.default_rng(0))
            for r in records:  # rank 0 is best: a lower rank wins for sign +1, loses for -1
                won, lost = ranks[system(r.chosen)], ranks[system(r.rejected)]
                assert (won < lost) if sign > 0 else (won > lost), (attr, sign, r.chosen, r.rejected)
    # the long plain answer against the short friendly one, by hand
    assert scaled["friendliness"][0] == 0.0  # the plain answer is neutral
    info = pool_mod.summary(pool, dataclasses.replace(cfg, max_new_tokens=7))
    assert info["cut_at_max_new_tokens_by_system"] == {s or "(none)": 1.0 for s in TEXTS}
    assert info["mean_scores_by_system"]["long"]["verbosity"] == 40.0
    long_i = next(i for i, c in enumerate(pool.candidates) if c.prompt == 0 and c.system == 1)
    kind_i = next(i for i, c in enumerate(pool.candidates) if c.prompt == 0 and c.system == 2)
    assert scaled["verbosity"][long_i] > scaled["verbosity"][kind_i]
    assert scaled["friendliness"][kind_i] > scaled["friendliness"][long_i]
    assert scaled["expertise"][long_i] > scaled["expertise"][kind_i]


def test_two_user_conflict_on_the_pool_through_build_pairs(tmp_path):
    from raypref.recipes.reward_data import RewardDataConfig, build_pairs, judge_reference

    cfg, pool = judged_pool(tmp_path)
    data = RewardDataConfig(source="pool", pool=cfg, label_noise=0.0, train_pairs_per_user=6,
                            test_pairs_per_user=3, demo_pool=2, n_demos=1)
    pairs = build_pairs(data)
    assert sorted(pairs) == [1, 2]
    train_prompts = {p for p, s in pool.prompts if s == "train"}
    for uid, up in pairs.items():
        attr = "verbosity" if uid == 1 else "friendliness"
        other = "friendliness" if uid == 1 else "verbosity"
        for r in up.train + up.test:  # each user's attribute decides, and the other user disagrees
            assert r.chosen_scores[attr] > r.rejected_scores[attr]
            assert r.chosen_scores[other] < r.rejected_scores[other]
        assert {r.prompt for r in up.train} <= train_prompts
        assert not {r.prompt for r in up.test} & train_prompts
    assert judge_reference(data, 3)["mean"] == 1.0
    noisy = judge_reference(dataclasses.replace(data, label_noise=0.5, test_pairs_per_user=6), 6)
    assert noisy["mean"] < 1.0
    with pytest.raises(ValueError, match="only 9 usable train pairs"):
        build_pairs(dataclasses.replace(data, train_pairs_per_user=12))


def test_cluster_users_follow_the_psoups_combinations():
    from raypref.recipes.reward_data import RewardDataConfig, pool_population

    users = pool_population(RewardDataConfig(source="pool", population="cluster", n_users=10))
    assert [u.group for u in users[:2]] == ["P1A+P2A+P3A", "P1A+P2A+P3B"]
    first = users[0].weights  # elementary, concise, friendly
    assert first["expertise"] < 0 and first["verbosity"] < 0 and first["friendliness"] > 0
    assert users[8].group == users[0].group and users[8].weights != users[0].weights
    assert all(abs(sum(abs(w) for w in u.weights.values()) - 1) < 1e-9 for u in users)


def test_missing_pool_is_a_clear_error(tmp_path):
    from raypref.recipes.reward_data import RewardDataConfig, build_pairs

    cfg = config(tmp_path)
    with pytest.raises(FileNotFoundError, match="python jobs/pool.py"):
        build_pairs(RewardDataConfig(source="pool", pool=cfg))
    with pytest.raises(ValueError, match="friendliness"):
        RewardDataConfig(source="pool", pool=dataclasses.replace(cfg, judges=["verbosity", "expertise"])).validate()


def test_comparison_config_on_the_pool_loads(tmp_path):
    from raypref.config import parse_args
    from raypref.experiments.reward_comparison import RewardCompareConfig

    cfg = parse_args(RewardCompareConfig, ["--config", "configs/reward-compare-smollm2.yaml"])
    assert cfg.data.source == "pool" and cfg.freeze_query_encoder
    assert cfg.arms == ["BT", "VAE", "VAE+adaptive", "VAE+contrastive", "UserModel"]
    assert cfg.seeds == [0, 1, 2] and cfg.data.label_noise is not None


@pytest.mark.slow
def test_tiny_real_pool_on_smollm2(tmp_path):
    """A few prompts, 2 system prompts, 16 new tokens under SmolLM2; judged by every judge."""
    cfg = PoolConfig(train_prompts=2, test_prompts=1, systems=["", pool_mod.default_systems()[3]],
                     max_new_tokens=16, batch_size=6, dir=str(tmp_path))
    pool = pool_mod.ensure_pool(cfg)
    assert len(pool.candidates) == 6 and all(0 < c.tokens <= 16 for c in pool.candidates)
    assert all(c.text for c in pool.candidates)
    assert set(pool.scores) == set(pool_mod.JUDGES) | {"quality"}
    assert np.all(pool.scores["fluency"] < 0) and np.all(pool.scores["verbosity"] > 0)
    assert pool_mod.ensure_pool(cfg, FakeLM(fail_at=1)).candidates == pool.candidates
    assert set(pool_mod.summary(pool, cfg)["spearman"]) == set(pool.scores)


def test_query_embeddings_cached_once_match_the_workers_own(tmp_path):
    """A frozen encoder's pair embeddings, precomputed for every run on the same data, are the
    ones a worker would compute itself (here on the pool's pairs)."""
    import torch

    from raypref.models.reward import EncoderConfig
    from raypref.recipes.reward import RewardConfig, RewardSpec, precompute_query_embeddings
    from raypref.recipes.reward_data import RewardDataConfig

    cfg, _ = judged_pool(tmp_path)
    data = RewardDataConfig(source="pool", pool=cfg, label_noise=0.0, train_pairs_per_user=4,
                            test_pairs_per_user=2, demo_pool=2, n_demos=1)
    recipe = RewardConfig(method="bt", freeze_query_encoder=True, eval_pairs_per_user=2, data=data,
                          encoder=EncoderConfig("tiny", max_length=64, tiny_hidden=16, tiny_heads=2))
    path = precompute_query_embeddings(recipe, tmp_path / "q.safetensors")
    cached = RewardSpec(recipe, query_embeddings_path=str(path)).query_embeddings()
    own = RewardSpec(recipe).query_embeddings()
    assert sorted(cached) == sorted(own) == [(1, "test"), (1, "train"), (2, "test"), (2, "train")]
    for key in own:
        assert cached[key].shape == own[key].shape and torch.allclose(cached[key], own[key], atol=1e-5)


def test_resolved_config_keys_the_same_pool_from_any_folder(tmp_path, monkeypatch):
    """A driver hands its workers absolute paths (they run in other folders); the pool's key
    must not change with that."""
    from raypref.recipes.pool import resolved

    (tmp_path / "q.txt").write_text("\n".join(f"Question number {i}?" for i in range(40)))
    monkeypatch.chdir(tmp_path)
    fake_model(tmp_path)
    cfg = PoolConfig(model="model", prompts="q.txt", train_prompts=3, test_prompts=2, dir="pools")
    absolute = resolved(cfg)
    assert absolute.dir == str(tmp_path / "pools") and absolute.prompts == str(tmp_path / "q.txt")
    assert absolute.model == str(tmp_path / "model")
    assert pool_folder(absolute) == tmp_path / pool_folder(cfg)
    assert resolved(PoolConfig()).model == "smollm2-135m-instruct"  # a name stays a name


def test_reward_spec_gets_absolute_pool_paths_without_touching_the_jobs_config(tmp_path):
    """The comparison's runs share one data config and their names hash it: the spec's copy is
    resolved for the workers, the config stays as given."""
    from raypref.experiments.reward import RewardExperiment, RewardJobConfig
    from raypref.experiments.run import Run
    from raypref.recipes.reward_data import RewardDataConfig

    cfg = RewardJobConfig(method="bt", data=RewardDataConfig(source="pool", pool=PoolConfig(dir="pools")))
    spec = RewardExperiment().spec(Run(cfg, "r", tmp_path))
    assert spec.cfg.data.pool.dir.startswith("/") and cfg.data.pool.dir == "pools"


# ---------------------------------------------------------------- the soups job's pairs from the pool

def soups_config(pool_cfg, **kw):
    from raypref.experiments.soups.config import SoupsConfig
    from raypref.experiments.soups.evaluate import EvalConfig

    base = dict(base_policy="smollm2-135m-instruct", pairs_source="pool", pool=pool_cfg,
                pairs_per_preference=12, label_noise=0.0, eval=EvalConfig(text_judges=True))
    return SoupsConfig(**{**base, **kw})


def test_soups_pairs_from_the_pool_are_labelled_by_each_preferences_text_judge(tmp_path):
    """Every arm labels the same pairs (two answers to one train prompt); P1B / P2B / P3A choose
    the answer its judge ranks higher, P1A / P2A / P3B the lower; held-out pairs come from the
    test prompts only; P-MORL's pair i follows combination i % 8 by the mean of its percentiles."""
    from raypref.data.labelling import preference_labeller
    from raypref.data.users import psoups_combinations, psoups_profile, text_attribute
    from raypref.experiments.soups.preferences import pool_data

    pool_cfg, pool = judged_pool(tmp_path)
    data = pool_data(soups_config(pool_cfg), pool, seed=0)
    train_prompts = {t for t, s in pool.prompts if s == "train"}
    test_prompts = {t for t, s in pool.prompts if s == "test"}

    def system(text):
        return next(s for s, t in TEXTS.items() if text.startswith(t))

    pairs = {name: [(r.prompt, frozenset((r.chosen, r.rejected))) for r in records]
             for name, records in data.train.items()}
    assert len(pairs["P1A"]) == 12 and len(set(pairs["P1A"])) == 12  # drawn without replacement
    assert all(p == pairs["P1A"] for p in pairs.values())
    checked = 0
    for name, records in data.train.items():
        ranks, sign = RANKS[text_attribute(name)], psoups_profile(name).direction
        assert all(r.prompt in train_prompts and r.user_text == psoups_profile(name).instruction for r in records)
        for r in records:
            won, lost = ranks[system(r.chosen)], ranks[system(r.rejected)]
            if won != lost:  # ties are decided by a coin
                assert (won < lost) if sign > 0 else (won > lost), (name, r.chosen, r.rejected)
                checked += 1
    assert checked >= 50
    assert all(r.prompt in test_prompts for rs in data.held_out.values() for r in rs)
    combos = psoups_combinations()
    for i, r in enumerate(data.pmorl):
        assert r.user_text == "+".join(combos[i % 8]) and r.prompt in train_prompts  # bare prompt
        label = preference_labeller(combos[i % 8])
        assert label(r.prompt, _Answer(r.chosen_scores)) >= label(r.prompt, _Answer(r.rejected_scores))
    assert data.pmorl_system == "combination"


class _Answer:
    def __init__(self, latent):
        self.latent = latent


def test_label_noise_flips_the_same_positions_for_every_arm(tmp_path):
    from raypref.experiments.soups.preferences import pool_data

    pool_cfg, pool = judged_pool(tmp_path)
    clean = pool_data(soups_config(pool_cfg), pool, seed=3)
    noisy = pool_data(soups_config(pool_cfg, label_noise=0.4), pool, seed=3)
    flipped = {name: [a.chosen != b.chosen for a, b in zip(clean.train[name], noisy.train[name])]
               for name in clean.train}
    assert 0 < sum(flipped["P1A"]) < 12
    assert all(f == flipped["P1A"] for f in flipped.values())
    assert noisy.stats["P2B"].flipped == sum(flipped["P2B"])


def test_pool_too_small_for_the_budget_is_a_clear_error(tmp_path):
    from raypref.experiments.soups.preferences import pool_data

    pool_cfg, pool = judged_pool(tmp_path)  # 3 train prompts x 6 pairs of 4 answers = 18
    with pytest.raises(ValueError, match="18 train pairs .* 19 asked"):
        pool_data(soups_config(pool_cfg, pairs_per_preference=19), pool, seed=0)


def test_answers_below_the_quality_floor_never_enter_a_pair_and_are_counted(tmp_path):
    from raypref.experiments.soups.preferences import pool_data

    pool_cfg, pool = judged_pool(tmp_path)
    long_answer = np.array([c.text.startswith(TEXTS["long"]) for c in pool.candidates])
    pool.scores["quality"] = np.where(long_answer, 0.1, 0.7)  # the long answers judged as word salad
    pool.min_quality = 0.4
    assert all(not long_answer[i] for idx in pool.by_prompt("train").values() for i in idx)
    assert pool.floor_line() == ("[pool] quality floor 0.4: 3 of 12 train answers, 2 of 8 test answers "
                                 "left out of pairs")
    # 3 train prompts x 3 answers left = 9 pairs; every arm's pairs are free of the long answer
    with pytest.raises(ValueError, match=r"9 train pairs .*quality floor 0.4 \(pool.min_quality\)\), 12 asked"):
        pool_data(soups_config(pool_cfg), pool, seed=0)
    data = pool_data(soups_config(pool_cfg, pairs_per_preference=9), pool, seed=0)
    texts = [t for rs in list(data.train.values()) + list(data.held_out.values()) for r in rs
             for t in (r.chosen, r.rejected)]
    assert texts and not any(t.startswith(TEXTS["long"]) for t in texts)
    # the floor travels with the config to every reader of the pool (the workers load it)
    assert pool_mod.load_pool(dataclasses.replace(pool_cfg, min_quality=0.4)).min_quality == 0.4
    # a floor needs quality scores: the config says which judges, the pool which scores it lacks
    del pool.scores["quality"]
    with pytest.raises(ValueError, match="min_quality=0.4 needs the pool's quality scores"):
        pool.by_prompt("train")
    with pytest.raises(ValueError, match="min_quality.*relevance and repetition"):
        config(tmp_path, min_quality=0.4).validate()


def test_soups_config_on_the_pool_checks_what_it_needs(tmp_path):
    from raypref.experiments.soups.evaluate import EvalConfig

    pool_cfg = config(tmp_path)
    soups_config(pool_cfg).validate()
    for kw, message in [(dict(base_policy=""), "pairs_source=pool: .* set base_policy"),
                        (dict(eval=EvalConfig()), "eval.text_judges=true"),
                        (dict(pairs_source="wrold"), "pairs_source='wrold'"),
                        (dict(label_noise=0.5), r"label_noise=0.5: must be in \[0, 0.5\)"),
                        (dict(preferences=["P3A", "P3C"], combinations=[]), "'P3C' .* has no text judge"),
                        (dict(eval=EvalConfig(text_judges=True, judge_model="tiny")), "choose one judge"),
                        (dict(algo="ppo"), "algo='ppo' does not learn from pairs")]:
        with pytest.raises(ValueError, match=message):
            soups_config(pool_cfg, **kw).validate()


def test_eval_prompts_with_pool_pairs_are_the_test_split():
    from raypref.data.prompts import load_prompts
    from raypref.experiments.soups import evaluate as ev

    prompts = ev.eval_prompts(ev.EvalConfig(n_prompts=5), None, "")
    assert prompts == load_prompts(None, split="test")[:5]
    assert not set(prompts) & set(load_prompts(None, split="train"))


def test_text_scorer_reads_each_dimension_by_its_judge():
    from raypref.eval.generation import TextScorer

    class Objectives:  # the TextObjectives interface: raw scores, then the scaled ones
        objectives = ["verbosity", "expertise", "friendliness", "quality"]

        def raw(self, prompts, texts):
            n = len(texts)
            return {"verbosity": np.full(n, 50.0), "expertise": np.full(n, 8.0), "friendliness": np.full(n, -0.5),
                    "quality": np.full(n, 0.7), "relevance": np.full(n, 0.8), "repetition": np.zeros(n),
                    "fluency": np.full(n, -2.0)}

        def scaled(self, raw):
            import torch
            return torch.tensor([[0.5, 0.4, -0.5, 0.7]] * len(raw["verbosity"]))

    scorer = TextScorer(Objectives())
    assert scorer.table(["P1A", "P2B", "P3A", "P3B"]) == {
        "P1A": ("expertise", -1), "P2B": ("verbosity", 1), "P3A": ("friendliness", 1), "P3B": ("friendliness", -1)}
    assert [scorer.sweep_key(p) for p in ("P1B", "P2B", "P3A")] == ["expertise", "verbosity", "friendliness"]
    row = scorer.score(["a", "b"], ["q", "q"])[1]
    assert row["friendliness"] == -0.5 and abs(row["quality"] - 0.7) < 1e-6 and row["relevance"] == 0.8


def test_soups_training_key_follows_the_pool_and_its_noise_but_not_for_world_runs(tmp_path):
    import dataclasses as dc

    from raypref.experiments.soups.config import SoupsConfig
    from raypref.experiments.soups.training import training_key

    pool_cfg = config(tmp_path)
    on_pool = soups_config(pool_cfg)
    keys = {training_key(on_pool), training_key(soups_config(pool_cfg, label_noise=0.2)),
            training_key(soups_config(dc.replace(pool_cfg, seed=1))),
            training_key(soups_config(pool_cfg, pairs_source="world"))}
    assert len(keys) == 4  # another pool or noise is other pairs: new runs, not a refused resume
    # a world run's key ignores the pool settings it never reads
    assert training_key(SoupsConfig()) == training_key(SoupsConfig(label_noise=0.3, pool=pool_cfg))


def test_fronts_pairs_come_from_the_shared_pool_as_the_soups_draw_them(tmp_path):
    """The fronts job's text pairs (`fronts.pool_pair_rows`) are the soups job's draw of the same
    pool (`candidate_pairs`, same seed): two answers to one train question, each carrying its
    judged scores on the fronts' footing (words / verbosity_words, VADER as judged)."""
    from raypref.experiments.fronts import pool_pair_rows
    from raypref.recipes.pool import candidate_pairs
    from raypref.rewards.text import TextObjectives

    _, pool = judged_pool(tmp_path, train_prompts=4)
    judge = TextObjectives(["verbosity", "friendliness"], 20.0)
    rows = pool_pair_rows(pool, judge, 12, seed=3)
    soups = candidate_pairs(pool, 12, [3, 0], "train")
    assert [r["responses"] for r in rows] == [[p.first.text, p.second.text] for p in soups]
    train = {text for text, split in pool.prompts if split == "train"}
    # the fake LM's answers repeat across questions: a candidate is its (question, text)
    index = {(pool.prompts[c.prompt][0], c.text): i for i, c in enumerate(pool.candidates)}
    for row in rows:
        assert row["prompt"] in train
        for text, scores in zip(row["responses"], row["scores"]):
            i = index[(row["prompt"], text)]
            assert scores == pytest.approx([pool.scores["verbosity"][i] / 20.0, pool.scores["friendliness"][i]])
    assert len({(r["prompt"], *r["responses"]) for r in rows}) == 12
    unjudged = dataclasses.replace(pool, scores={k: v for k, v in pool.scores.items() if k != "friendliness"})
    with pytest.raises(ValueError, match="no scores of \\['friendliness'\\]"):
        pool_pair_rows(unjudged, judge, 2, seed=3)
    with pytest.raises(ValueError, match="has 24 train pairs .* 25 asked"):
        pool_pair_rows(pool, judge, 25, seed=3)


def test_text_fronts_label_each_objective_and_pmorl_from_the_pool(tmp_path, smollm2_tokenizer_dir):
    """`fronts.text_setting` on a judged pool and SmolLM2's chat template: the verbosity policy's
    chosen answer is the wordier one, the friendliness policy's the friendlier (ties by a coin),
    and each P-MORL pair chooses by the weights its system text states."""
    import re

    from raypref.experiments.fronts import FrontsConfig, text_setting

    pool_cfg, pool = judged_pool(tmp_path, train_prompts=4)
    cfg = FrontsConfig(judges="text", base_policy=smollm2_tokenizer_dir, objectives=["verbosity", "friendliness"],
                       pairs_per_policy=12, eval_prompts=2, verbosity_words=20.0, pool=pool_cfg,
                       methods=["psoups", "pmorl"])
    cfg.validate()
    setting = text_setting(cfg, tmp_path / "run")
    score = {(pool.prompts[c.prompt][0], c.text): (pool.scores["verbosity"][i] / 20.0, pool.scores["friendliness"][i])
             for i, c in enumerate(pool.candidates)}
    assert setting["preferences"] == ["P2B", "P3A"]
    for k, pref in enumerate(setting["preferences"]):
        records = setting["psoups"][pref]
        assert len(records) == 12
        decided = [(score[(r.prompt, r.chosen)][k], score[(r.prompt, r.rejected)][k]) for r in records]
        assert all(a >= b for a, b in decided), pref
        assert sum(a > b for a, b in decided) >= 6, pref  # not all ties: the judges tell these apart
    assert len(setting["pmorl"]) == 24
    for r in setting["pmorl"]:
        w = [float(x) for x in re.findall(r"(?:verbosity|friendliness)\*([0-9.]+)", r.user_text)]
        assert len(w) == 2, r.user_text
        value = [w[0] * score[(r.prompt, t)][0] + w[1] * score[(r.prompt, t)][1] for t in (r.chosen, r.rejected)]
        assert value[0] >= value[1] - 1e-6, (r.user_text, value)
