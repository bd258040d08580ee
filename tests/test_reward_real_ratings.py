"""Multi-objective regression on real fine-grained ratings, chosen by configuration."""
from pathlib import Path

import pytest
import torch

from raypref.models.reward import EncoderConfig
from raypref.recipes.reward import RewardConfig, RewardSpec, RewardTraining
from raypref.recipes.reward_data import RewardDataConfig, build_pairs
from raypref.train.spec import StepContext

FIXTURES = Path(__file__).parent / "fixtures"


def _data(name="helpsteer.jsonl", schema="helpsteer", **kw):
    return RewardDataConfig(source=str(FIXTURES / name), schema=schema, train_pairs_per_user=8,
                            test_pairs_per_user=2, demo_pool=4, n_demos=2, **kw)


def _cfg(data, **kw):
    return RewardConfig(method="multi_objective", data=data, freeze_query_encoder=True,
                        encoder=EncoderConfig("tiny", max_length=64, tiny_hidden=16, tiny_heads=2),
                        eval_pairs_per_user=2, training=RewardTraining(steps=2, micro_batch_size=4),
                        **kw)


@pytest.mark.parametrize("name,schema,attributes", [
    ("helpsteer.jsonl", "helpsteer", 5), ("ultrafeedback.jsonl", "ultrafeedback", 4)])
def test_multi_objective_trains_on_real_ratings(name, schema, attributes):
    data = _data(name, schema) if schema == "helpsteer" else RewardDataConfig(
        source=str(FIXTURES / name), schema=schema, train_pairs_per_user=2, test_pairs_per_user=1,
        demo_pool=2, n_demos=1)
    spec = RewardSpec(_cfg(data))
    pairs = build_pairs(data)
    assert list(pairs) == [1] and len(pairs[1].test) == data.test_pairs_per_user
    assert pairs[1].user.weights == spec.pairs[1].user.weights  # quality weights of the loader
    torch.manual_seed(0)
    model = spec.build_model()
    assert len(model.attributes) == attributes
    ctx = StepContext(step=1, max_steps=2, rank=0, world_size=1, micro_batch_size=2, grad_accum=1,
                      seed=0, models={"reward": model})
    batch = spec.collate(model, [(1, 0), (1, len(pairs[1].train) - 1)], None, 0)
    record = pairs[1].train[0]
    low, high = (0.0, 4.0) if schema == "helpsteer" else (1.0, 5.0)
    expected = [(record.chosen_scores[a] - low) / (high - low) * 100 for a in model.attributes]
    assert batch["chosen_targets"][0].tolist() == pytest.approx(expected)
    loss, metrics = spec.loss(batch, ctx)
    assert torch.isfinite(loss) and metrics["mse"] > 0
    batch["chosen_targets"][0, 0] = float("nan")  # an unrated attribute is masked, not NaN
    assert torch.isfinite(spec.loss(batch, ctx)[0])
    model.eval()
    with torch.no_grad():
        assert set(spec.evaluate(ctx)) == {"acc.user1", "acc.mean", "acc.min"}


def test_real_source_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="data.source=.*train the multi_objective method, not 'bt'"):
        RewardConfig(method="bt", data=_data()).validate()
    with pytest.raises(ValueError, match="data.schema='hh'"):  # prism / trl pairs are known: tests/test_own_data.py
        _data(schema="hh").validate()
    with pytest.raises(FileNotFoundError, match="data.source="):
        build_pairs(RewardDataConfig(source=str(tmp_path / "none.jsonl"), train_pairs_per_user=8,
                                     demo_pool=4, n_demos=2))
    with pytest.raises(ValueError, match="10 valid pairs, need more than data.test_pairs_per_user=10"):
        build_pairs(RewardDataConfig(source=str(FIXTURES / "helpsteer.jsonl"), train_pairs_per_user=8,
                                     test_pairs_per_user=10, demo_pool=4, n_demos=2))
