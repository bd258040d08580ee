"""Personalized Soups job: config checks, sweep weights, P-MORL pairs, and the job end to end."""
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from raypref.data.users import psoups_profile
from raypref.data.world import World
from raypref.recipes.dpo import DPOConfig
from raypref.train.runner import Optimization, Resources
from raypref.recipes.sft import SFTConfig
from raypref.experiments.soups import evaluate as ev
from raypref.experiments.soups.config import SoupsConfig
from raypref.experiments.soups.preferences import pmorl_pairs, preference_reward
from raypref.experiments.soups.run import run_soups, soup_name

ALL = ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]


def test_sweep_weights_sum_to_one_and_move_only_one_dimension():
    dims = ev.dimensions_of(ALL)
    assert dims == {"expertise": ("P1B", "P1A"), "informativeness": ("P2B", "P2A"),
                    "style": ("P3A", "P3B")}
    for t in (0.0, 0.25, 1.0):
        w = ev.sweep_weights(dims, "style", t)
        assert sum(w.values()) == pytest.approx(1.0)
        assert w["P3A"] == pytest.approx(t / 3) and w["P3B"] == pytest.approx((1 - t) / 3)
        assert w["P1A"] == w["P1B"] == w["P2A"] == w["P2B"] == pytest.approx(1 / 6)


def test_is_monotonic_rejects_flat_steps():
    assert ev.is_monotonic([0.1, 0.2, 0.3])
    assert not ev.is_monotonic([0.1, 0.1, 0.3])
    assert not ev.is_monotonic([0.1, 0.3, 0.2])
    assert ev.is_monotonic([0.3, 0.2], increasing=False)


def test_soup_names_state_weights_in_mlflow_safe_form():
    name = soup_name({"P1A": 1 / 3, "P2B": 1 / 3, "P3A": 1 / 3, "P3B": 0.0})
    assert name == "psoups-P1A_0p333-P2B_0p333-P3A_0p333"
    assert "." not in name


def test_preference_reward_follows_direction():
    world = World(seed=0)
    rng = np.random.default_rng(0)
    prompt = world.prompts(1)[0]
    short = world.sample_response(prompt, rng, {"verbosity": 0.0}).text
    long = world.sample_response(prompt, rng, {"verbosity": 1.0}).text
    s_short, s_long = world.judge(short, prompt), world.judge(long, prompt)
    assert preference_reward("P2B", s_long) > preference_reward("P2B", s_short)
    assert preference_reward("P2A", s_short) > preference_reward("P2A", s_long)
    assert psoups_profile("P2A").attribute == "verbosity"


def test_pmorl_pairs_are_labelled_by_mean_reward_with_instruction_in_prompt():
    world = World(seed=0)
    combos = [["P1A", "P2A", "P3A"], ["P1B", "P2B", "P3B"]]
    pairs = pmorl_pairs(world, combos, 40, np.random.default_rng(1))
    assert len(pairs) == 40
    for rec in pairs:
        combo = rec.user_text.split("+")
        assert combo in combos
        assert rec.prompt.endswith(world.preference_instruction(combo))
        bare = rec.prompt[: -len(world.preference_instruction(combo))].strip()
        mean = [np.mean([preference_reward(p, world.judge(t, bare)) for p in combo])
                for t in (rec.chosen, rec.rejected)]
        assert mean[0] > mean[1]


@pytest.mark.parametrize("change, message", [
    ({"preferences": ["P9Z"]}, "unknown"),
    ({"combinations": [["P1A", "P2A"]], "preferences": ["P1A"]}, "not in preferences"),
    ({"algo": "ppo"}, "available per-preference trainers"),
    ({"inject_failures": {"P1A": "sometimes"}}, "once"),
    ({"psoups_files": {"P1A": "x.json"}}, "pmorl"),
])
def test_config_errors_name_the_problem(change, message):
    cfg = SoupsConfig(**change)
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def tiny_config(tmp_path: Path, **overrides) -> SoupsConfig:
    sft = SFTConfig(corpus_size=300, output_dir=str(tmp_path / "sft"),
                    training=Optimization(steps=30, micro_batch_size=16, lr=2e-3, warmup_steps=5),
                    resources=Resources(checkpoint_every=30, zero_stage=0))
    return SoupsConfig(
        output_dir=str(tmp_path / "soups"),
        preferences=["P2A", "P2B", "P3A", "P3B"],
        combinations=[["P2A", "P3A"], ["P2B", "P3B"]],
        user_weights={"P2A": 0.7, "P3A": 0.3},
        sft=sft,
        pairs_per_preference=48,
        training=DPOConfig(steps=6, micro_batch_size=8, warmup_steps=1),
        resources=Resources(cpus_per_worker=0.3, checkpoint_every=2, max_failures=1),
        eval=ev.EvalConfig(n_prompts=6, max_new_tokens=24, weight_grid=[0.0, 0.5, 1.0]),
        **overrides)


@pytest.mark.slow
def test_soups_job_survives_failures_merges_evaluates_and_registers(tmp_path, ray_local):
    # P2B's worker dies once (Ray Train restarts it from its checkpoint); P3B's dies on every
    # attempt, so it is reported and the soups are built from the others.
    cfg = tiny_config(tmp_path, inject_failures={"P2B": "once", "P3B": "always"})
    result = run_soups(cfg)

    assert set(result.failed) == {"P3B"}
    assert "failed" in result.failed["P3B"].lower()
    assert (Path(cfg.output_dir) / ".injected-P2B").exists(), "the injected crash of P2B never happened"

    report = result.report_path.read_text()
    assert "P3B" in report.split("## Failed runs")[1].split("##")[0]
    failures = json.loads((Path(cfg.output_dir) / "failures.json").read_text())
    assert set(failures) == {"P3B"}

    names = result.win_rates["names"]
    assert names == ["P-Soups", "SFT", "Prompting", "P-MORL"]
    rates = np.array(result.win_rates["rates"], dtype=float)
    assert rates.shape == (4, 4) and np.isnan(np.diag(rates)).all()

    # P2B+P3B loses P3B: its soup is renormalized onto P2B alone and named for what it is
    merged = Path(cfg.output_dir) / "merged"
    saved = sorted(p.name for p in merged.iterdir())
    assert saved == ["psoups-P2A_0p500-P3A_0p500", "psoups-P2A_0p700-P3A_0p300",
                     "psoups-P2B_1p000"]
    for name in saved:
        assert (merged / name / "model.safetensors").exists()
        weights = json.loads((merged / name / "soup_weights.json").read_text())
        assert sum(weights.values()) == pytest.approx(1.0)
    registered = {m.name for m in mlflow.MlflowClient().search_registered_models()}
    assert set(saved) <= registered

    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["failed_runs"] == 1
    assert "heldout_reward_accuracy.P2A" in run.data.metrics
    assert set(result.sweep) == {"informativeness"}
    assert len(result.sweep["informativeness"]["scores"]) == 3
    assert (result.report_path.parent / "sweep.png").exists()
    assert (result.report_path.parent / "win_rates.png").exists()


def test_failed_preferences_drop_out_of_a_soup_by_renormalizing():
    from raypref.experiments.soups.run import over_trained

    assert over_trained({"P1A": 0.5, "P2B": 0.25, "P3A": 0.25}, ["P1A", "P3A"]) == \
        pytest.approx({"P1A": 2 / 3, "P3A": 1 / 3})
    assert over_trained({"P1A": 1.0}, ["P2A"]) == {}


def test_user_weights_are_validated_before_any_training():
    with pytest.raises(ValueError, match="sum to 1"):
        SoupsConfig(user_weights={"P1A": 0.5, "P2A": 0.2}).validate()
    with pytest.raises(ValueError, match="unknown"):
        SoupsConfig(user_weights={"P7Q": 1.0}).validate()
    with pytest.raises(ValueError, match=">= 0"):
        SoupsConfig(user_weights={"P1A": 1.5, "P2A": -0.5}).validate()


def test_training_key_ignores_evaluation_but_not_training():
    from raypref.experiments.soups.run import training_key

    base = SoupsConfig()
    other_eval = SoupsConfig()
    other_eval.eval.n_prompts = 3
    other_training = SoupsConfig()
    other_training.training.beta = 0.1
    assert training_key(base) == training_key(other_eval)
    assert training_key(base) != training_key(other_training)


def test_real_preference_files_are_validated_and_quarantined(tmp_path):
    """The soups job's real-data path: bad rows of a P-Soups file are quarantined with their
    line; over the limit the job stops before any training."""
    from raypref.data.quarantine import QuarantineExceeded
    from raypref.data.world import World
    from raypref.experiments.soups.run import preference_data

    fixture = Path(__file__).parent / "fixtures" / "P1A.json"  # 3 rows, one with a blank response
    cfg = SoupsConfig(output_dir=str(tmp_path), preferences=["P1A"], combinations=[["P1A"]],
                      baselines=["sft"], psoups_files={"P1A": str(fixture)}, max_quarantine_fraction=0.5)
    data = preference_data(cfg, World(0))
    train, held_out = data["P1A"]
    assert len(train) + len(held_out) == 2
    entries = [json.loads(line) for line in (tmp_path / "quarantine" / "P1A.jsonl").read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["reason"] == "empty_text"

    cfg.max_quarantine_fraction = 0.2  # 1 of 3 rows is bad: over the limit
    with pytest.raises(QuarantineExceeded, match="P1A"):
        preference_data(cfg, World(0))
