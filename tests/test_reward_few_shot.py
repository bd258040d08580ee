"""Few-shot prompting baseline (Liu 2025 §3.3): prompts, letter scoring, greedy vs random."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raypref.data.world import World
from raypref.eval.few_shot import (FewShotConfig, build_scorer, choice_matrix, evaluate_few_shot,
                                   few_shot_prompt, question_pool)
from raypref.models.factory import ModelConfig
from raypref.recipes.reward_data import RewardDataConfig, build_pairs

DATA = RewardDataConfig(train_pairs_per_user=12, test_pairs_per_user=4, demo_pool=6, n_demos=2)
TINY_LM = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_positions=2048)


def test_each_user_sees_their_own_answers():
    pairs = build_pairs(DATA)
    questions = question_pool(pairs, DATA.demo_pool)
    users = [pairs[u].user for u in sorted(pairs)]
    choices = choice_matrix(users, questions)
    assert choices.shape == (2, 12)
    # the conflict population disagrees on every question (agreeing pairs were dropped)
    assert (choices[0] != choices[1]).all()
    # a user's own pool is answered by its own (noise-free) utility
    for j, q in enumerate(questions):
        u = users[0]
        assert choices[0, j] == int(u.utility(q.rejected_scores) > u.utility(q.chosen_scores))
    q = questions[0]
    texts = [few_shot_prompt([(q, int(choices[z, 0]))], "p", "x", "y", np.random.default_rng(0))
             for z in (0, 1)]
    answer = [t.split("preferred:")[1].split()[0] for t in texts]
    assert sorted(answer) == ["A", "B"]  # same layout (same rng), opposite answers
    shown_first = texts[0].split("response A: ")[1].split(" response B:")[0]
    preferred_by_0 = q.chosen if choices[0, 0] == 0 else q.rejected
    assert (answer[0] == "A") == (shown_first == preferred_by_0)
    assert texts[0].endswith("response A: x response B: y preferred:")


def test_letter_margins_are_the_lm_log_probabilities():
    cfg = FewShotConfig(model=TINY_LM)
    scorer = build_scorer(cfg, World(0, 0.0).vocabulary())
    prompts = ["question: hello response A: x response B: y preferred:", "question: hi preferred:"]
    got = scorer.margins(prompts, batch_size=2)  # padded together
    for i, p in enumerate(prompts):
        ids = torch.tensor([scorer.tokenizer(p, add_special_tokens=False)["input_ids"]])
        logp = scorer.model(input_ids=ids).logits[0, -1].log_softmax(-1)
        a, b = scorer.letters
        assert got[i].item() == pytest.approx((logp[a] - logp[b]).item(), abs=1e-5)


def test_few_shot_evaluation_on_a_cluster_population():
    data = RewardDataConfig(population="cluster", n_users=4, train_pairs_per_user=10,
                            test_pairs_per_user=3, demo_pool=5, n_demos=2)
    result = evaluate_few_shot(FewShotConfig(model=TINY_LM, k=3, random_draws=2), data, 3)
    uids = sorted(build_pairs(data))
    for sel in ("greedy", "random"):
        assert set(f"{sel}.acc.user{u}" for u in uids) <= set(result)
        assert all(0.0 <= result[f"{sel}.acc.user{u}"] <= 1.0 for u in uids)
    # greedy information gain is at least the random selections' (here: strictly above)
    assert result["greedy.information"] > result["random.information"]
    assert result["greedy.information"] <= np.log(len(uids)) + 1e-9
    with pytest.raises(ValueError, match="few_shot.k=50"):
        evaluate_few_shot(FewShotConfig(model=TINY_LM, k=50), data, 3)


@pytest.mark.slow
def test_reward_job_few_shot(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from jobs.reward import main  # the entry point: --method few_shot trains nothing

    final = main(["--method", "few_shot", "--output_dir", str(tmp_path),
                  "--few_shot.model.n_layer", "1", "--few_shot.model.n_embd", "16",
                  "--few_shot.model.n_head", "2", "--few_shot.k", "2",
                  "--few_shot.random_draws", "1", "--data.train_pairs_per_user", "12",
                  "--data.test_pairs_per_user", "4", "--data.demo_pool", "6",
                  "--data.n_demos", "2", "--eval_pairs_per_user", "4"])
    assert {"greedy.acc.mean", "random.acc.mean", "greedy.information"} <= set(final)
    assert (tmp_path / "mlflow.db").exists()
