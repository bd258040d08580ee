"""The comparison table's arithmetic (Liu 2025 Tables 2-4) on known histories."""

import pytest

from raypref.experiments.reward_comparison import (ARMS, format_table, steps_to_fraction,
                                                   summarize)


def _history(accs, worst=0.4, every=10):
    rows = []
    for i, acc in enumerate(accs, start=1):
        rows.append({"step": i * every - 5, "loss": 1.0})  # a log-only row: no evaluation
        rows.append({"step": i * every, "eval.acc.mean": acc, "eval.acc.min": worst})
    return rows


def test_steps_to_95_percent_of_final():
    curve = [(10, 0.5), (20, 0.7), (30, 0.86), (40, 0.9)]
    assert steps_to_fraction(curve) == 30  # 0.86 >= 0.95 * 0.9 = 0.855; 0.7 is not
    assert steps_to_fraction([(10, 0.5)]) == 10
    with pytest.raises(ValueError, match="no evaluation"):
        steps_to_fraction([])


def test_summary_rows():
    runs = {"BT": [_history([0.5, 0.52]), _history([0.5, 0.48])],
            "VAE": [_history([0.6, 0.9, 0.9]), _history([0.5, 0.55, 0.59]), _history([0.7, 0.8, 0.95])]}
    rows = summarize(runs, {"BT": [10.0, 12.0], "VAE": [30.0, 30.0, 33.0]})
    bt, vae = rows
    assert bt["acc_mean"] == pytest.approx(0.5) and bt["acc_std"] == pytest.approx(0.02 ** 0.5 * 0.2)
    assert bt["converged"] == 0 and bt["runs"] == 2 and bt["seconds_per_run"] == 11.0
    assert vae["converged"] == 2  # 0.9 and 0.95 pass 0.6; 0.59 does not
    assert vae["steps95_mean"] == pytest.approx((20 + 30 + 30) / 3)  # .9>=.855; .55<.5605; .8<.9025
    table = format_table(rows)
    assert "| VAE | 0.813 ± 0.195 | 2/3 | 27 ± 6 | 0.400 | 31 |" in table
    assert "reference" not in table
    with_reference = format_table(rows, {"mean": 0.85, "min": 0.82})
    assert with_reference.splitlines()[-1] == ("| world judge, true weights (reference) | 0.850 | – | – "
                                             "| 0.820 | – |")


def test_judge_reference_falls_with_difficulty_and_label_noise():
    from raypref.recipes.reward_data import RewardDataConfig, judge_reference

    def reference(**kw):
        return judge_reference(RewardDataConfig(test_pairs_per_user=60, **kw), 50)

    clean = reference(difficulty=0.0, label_noise=0.0)
    assert clean == {"user1": 1.0, "user2": 1.0, "mean": 1.0, "min": 1.0}
    flipped = reference(difficulty=0.0, label_noise=0.3)  # the judge is right, 30% of labels are not
    assert 0.55 <= flipped["mean"] <= 0.85
    assert flipped["min"] == min(flipped["user1"], flipped["user2"])
    assert reference(difficulty=0.5)["mean"] < reference(difficulty=0.1)["mean"] < 1.0
    with pytest.raises(ValueError, match="no world judge"):
        judge_reference(RewardDataConfig(source="ratings.jsonl"), 10)


def test_arm_configs_set_every_knob(tmp_path):
    from raypref.experiments.reward_comparison import RewardCompareConfig, arm_config

    base = RewardCompareConfig(contrastive=0.5, gradient="mgda", output_dir=str(tmp_path))
    bt = arm_config(base, "BT", 4)
    assert (bt.method, bt.contrastive, bt.gradient, bt.seed) == ("bt", 0.0, "sum", 4)
    assert arm_config(base, "VAE+PCGrad", 0).gradient == "pcgrad"
    assert set(ARMS) == {"BT", "VAE", "VAE+adaptive", "VAE+contrastive", "VAE+PCGrad", "UserModel"}
    assert RewardCompareConfig().arms == ["BT", "VAE", "VAE+adaptive", "VAE+contrastive", "VAE+PCGrad"]
    assert arm_config(base, "UserModel", 0).method == "user_model"
    with pytest.raises(ValueError, match="arms=\\['GPT'\\]"):
        RewardCompareConfig(arms=["GPT"]).validate()
