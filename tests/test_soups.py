"""Personalized Soups job: config checks, one labelling path, comparisons, failures, and the job end to end."""
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
from raypref.experiments.soups.run import run_soups, soup_name, usable_combinations

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
        # alone: the dimension's two policies only, the whole mass between them
        assert ev.sweep_weights(dims, "style", t, alone=True) == {"P3A": t, "P3B": 1.0 - t}


def test_is_monotonic_rejects_flat_steps():
    assert ev.is_monotonic([0.1, 0.2, 0.3])
    assert not ev.is_monotonic([0.1, 0.1, 0.3])
    assert not ev.is_monotonic([0.1, 0.3, 0.2])
    assert ev.is_monotonic([0.3, 0.2], increasing=False)


def test_soup_names_state_weights_in_mlflow_safe_form():
    name = soup_name({"P1A": 1 / 3, "P2B": 1 / 3, "P3A": 1 / 3, "P3B": 0.0})
    assert name == "psoups-P1A_0p333-P2B_0p333-P3A_0p333"
    assert "." not in name


def test_samples_per_prompt_follow_the_seed_count_unless_set():
    """0 = 2 samples per prompt with one seed, 1 with several; a set value is kept; an unresolved 0
    cannot reach generation (it would judge nothing)."""
    from raypref.eval.generation import judged_generations

    assert [ev.for_seeds(ev.EvalConfig(), n).samples_per_prompt for n in (1, 2, 3)] == [2, 1, 1]
    assert ev.for_seeds(ev.EvalConfig(samples_per_prompt=3), 3).samples_per_prompt == 3
    with pytest.raises(ValueError, match="samples_per_prompt=0"):
        judged_generations(None, None, None, ["a prompt"], ev.EvalConfig())


@pytest.mark.parametrize("change, message", [
    ({"preferences": ["P9Z"]}, "unknown"),
    ({"combinations": [["P1A", "P2A"]], "preferences": ["P1A"]}, "not in preferences"),
    ({"algo": "reward"}, "available per-preference trainers"),
    ({"inject_failures": {"P1A": "sometimes"}}, "once"),
    ({"psoups_files": {"P1A": "x.json"}, "eval": ev.EvalConfig(judge_model="tiny")}, "pmorl"),
    ({"psoups_files": {"P1A": "x.json"}, "baselines": ["sft"]}, "eval.judge_model"),
    ({"base_policy": "some/model", "eval": ev.EvalConfig(judge_model="tiny")}, "eval.prompts_file"),
    ({"seeds": 0}, "seeds=0"),
    ({"max_concurrent_runs": -1}, "max_concurrent_runs=-1"),
    ({"eval": ev.EvalConfig(arms=["instructed", "nope"])}, "eval.arms"),
    ({"eval": ev.EvalConfig(samples_per_prompt=-1)}, "eval.samples_per_prompt"),
    ({"user_target": {"P1A": 1.0}}, "user_target: needs user_weights"),
    ({"user_weights": {"P1A": 1.0}, "user_target": {"P9Z": 1.0}}, r"user_target: \['P9Z'\] are not in preferences"),
    ({"user_weights": {"P1A": 1.0}, "user_target": {"P1A": -1.0}}, "user_target=.*>= 0"),
    ({"user_weights": {"P9Z": 1.0}}, "user_weights=.*unknown policy names"),
])
def test_config_errors_name_the_problem(change, message):
    cfg = SoupsConfig(**change)
    with pytest.raises(ValueError, match=message):
        cfg.validate()


@pytest.fixture(scope="module")
def sft_cache(tmp_path_factory) -> Path:
    """One SFT cache for the module's job tests (the SFT is cached by config hash)."""
    return tmp_path_factory.mktemp("sft")


def tiny_config(tmp_path: Path, sft_cache: Path, **overrides) -> SoupsConfig:
    # enough SFT for world-like text: the behaviour check reads the judges of generations
    sft = SFTConfig(corpus_size=1000, output_dir=str(sft_cache),
                    training=Optimization(steps=200, micro_batch_size=16, lr=2e-3, warmup_steps=10),
                    resources=Resources(checkpoint_every=200, zero_stage=0))
    settings = dict(preferences=["P2A", "P2B", "P3A", "P3B"],
                    combinations=[["P2A", "P3A"], ["P2B", "P3B"]],
                    user_weights={"P2A": 0.7, "P3A": 0.3}, user_target={"P2A": 0.5, "P3A": 0.5},
                    resources=Resources(cpus_per_worker=0.3, checkpoint_every=2, max_failures=1))
    settings.update(overrides)
    return SoupsConfig(
        output_dir=str(tmp_path / "soups"),
        sft=sft,
        pairs_per_preference=48,
        training=DPOConfig(steps=12, micro_batch_size=8, warmup_steps=2, lr=2e-3),
        # max_new_tokens stays at its default (128): the world's verbosity judge reads 0 below
        # ~60 words, so shorter cuts score every arm 0 (make_scorer refuses them)
        eval=ev.EvalConfig(n_prompts=8, weight_grid=[0.0, 0.5, 1.0], n_boot=200),
        **settings)


@pytest.mark.slow
def test_soups_job_survives_failures_merges_evaluates_and_registers(tmp_path, sft_cache, ray_local, monkeypatch):
    # P2B's worker dies once (Ray Train restarts it from its checkpoint); P3B's dies on every
    # attempt, so it is reported, and P2B+P3B is left out of every comparison.
    cfg = tiny_config(tmp_path, sft_cache, inject_failures={"P2B": "once", "P3B": "always"},
                      resources=Resources(cpus_per_worker=1.0, checkpoint_every=2, max_failures=1))
    result = run_soups(cfg)

    assert set(result.failed) == {"P3B-s0"}
    cause = result.failed["P3B-s0"]
    assert "Error" in cause.split(":")[0], cause
    assert (Path(cfg.output_dir) / ".injected-P2B-s0").exists(), "the injected crash of P2B never happened"
    assert result.excluded == ["P2B+P3B"]

    report = result.report_path.read_text()
    failures_section = report.split("## Failed runs")[1].split("\n## ")[0]
    assert f"**P3B-s0**: {cause}" in failures_section and "P2B+P3B" in failures_section
    failures = json.loads((Path(cfg.output_dir) / "failures.json").read_text())
    assert set(failures) == {"P3B-s0"} and failures["P3B-s0"]["cause"] == cause

    names = result.win_rates["names"]
    assert names == ["P-Soups", "P-Soups+instr", "P-Soups (A/B avg)", "SFT", "Prompting", "P-MORL"]
    rates = np.array(result.win_rates["rates"], dtype=float)
    assert rates.shape == (6, 6) and np.isnan(np.diag(rates)).all()
    # the left-out combination is in no table: only AA (P2A+P3A) is a column of the W/L/T table
    wlt = report.split("## P-Soups per combination")[1].split("\n## ")[0]
    assert "| battle | AA | all | win rate |" in wlt and "BB" not in wlt
    assert "## Criteria-wise win rate of P-Soups" in report
    assert result.win_rates["intervals"]["P-Soups vs P-MORL"].count("[") == 1
    assert set(result.quality) >= set(names) and all(0 <= q <= 1 for q in result.quality.values())
    assert "## General quality" in report

    merged = Path(cfg.output_dir) / "merged"
    saved = sorted(p.name for p in merged.iterdir())
    assert saved == ["psoups-P2A_0p500-P3A_0p500", "psoups-P2A_0p700-P3A_0p300"]
    for name in saved:
        assert (merged / name / "model.safetensors").exists()
    _assert_saved_soups_are_their_named_merges(Path(cfg.output_dir), merged, saved)
    registered = {m.name for m in mlflow.MlflowClient().search_registered_models()}
    assert set(saved) <= registered

    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["failed_runs"] == 1
    children = mlflow.search_runs(experiment_ids=[run.info.experiment_id], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"policy P2A seed 0", "policy P2B seed 0", "policy P3A seed 0",
                            "policy P3B seed 0", "baseline P-MORL seed 0", "baseline SFT seed 0",
                            "baseline Prompting seed 0"}
    p2a = by_name["policy P2A seed 0"]
    assert p2a.data.params["preference"] == "P2A" and "heldout.reward_accuracy" in p2a.data.metrics
    assert len(mlflow.MlflowClient().get_metric_history(p2a.info.run_id, "loss")) == cfg.training.steps
    assert mlflow.artifacts.list_artifacts(run_id=p2a.info.run_id, artifact_path="adapter")
    assert by_name["policy P3B seed 0"].info.status == "FAILED"
    assert by_name["policy P3B seed 0"].data.tags["raypref.failure"] == cause
    assert "eval.quality" in by_name["baseline SFT seed 0"].data.metrics

    # behaviour: on held-out prompts P2B alone (w=1) is wordier than SFT, P2A alone (w=0) terser
    sweep = result.sweep["informativeness"]
    assert sweep["attribute"] == "verbosity" and len(sweep["scores"]) == 3
    assert sweep["scores"][-1] > result.sft_scores["verbosity"] > sweep["scores"][0], \
        (sweep["scores"], result.sft_scores["verbosity"])

    # a rerun retrains only the failed run: the finished ones are reused without Ray Train
    from raypref.data.world import World
    from raypref.experiments.soups.preferences import simulated_data
    from raypref.experiments.soups.training import train_policies, training_jobs, training_key
    from raypref.recipes.sft import train_sft

    cfg.inject_failures = {}
    world = World(seed=cfg.sft.world_seed, difficulty=cfg.sft.difficulty)
    jobs = training_jobs(cfg, str(train_sft(cfg.sft)), [simulated_data(cfg, world, cfg.seed)],
                         str(Path(cfg.output_dir).resolve() / "runs" / training_key(cfg)))
    outcomes, reused = train_policies(jobs)
    assert reused == ["P-MORL-s0", "P2A-s0", "P2B-s0", "P3A-s0"]
    assert outcomes["P3B-s0"].ok and outcomes["P3B-s0"].result.final_step == cfg.training.steps
    assert outcomes["P2A-s0"].result.metrics[-1]["step"] == cfg.training.steps

    # the user's soup is scored for its user, and a soups sweep trial of this very config (its
    # runs where the sweep keeps them: <sweep>/soups) reuses the runs and reports the same score
    from ray import tune

    from raypref.experiments.sweep import _soups_trial

    assert 0.0 <= result.user_score <= 1.0 and run.data.metrics["user_score"] == pytest.approx(result.user_score)
    reports = []
    monkeypatch.setattr(tune, "report", lambda metrics: reports.append(dict(metrics)))
    _soups_trial(cfg, {"sft_folder": cfg.sft.output_dir}, "trial_001", tmp_path)
    assert reports[-1]["prompts"] == cfg.eval.n_prompts
    assert reports[-1]["user_score"] == pytest.approx(result.user_score, abs=1e-9)


@pytest.mark.slow
def test_real_data_is_judged_by_the_lm_judge_on_the_prompts_file(tmp_path, sft_cache, ray_local):
    """The real-data path end to end: a P-Soups file trains the policy, the (tiny) LM judge
    scores every response by preference name on the user's prompts."""
    fixture = Path(__file__).parent / "fixtures" / "P1A.json"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("what is a cell ?\nwhat is a star ?\n")
    cfg = tiny_config(tmp_path, sft_cache, preferences=["P1A"], combinations=[["P1A"]],
                      baselines=["sft", "prompting"], psoups_files={"P1A": str(fixture)},
                      max_quarantine_fraction=0.5, register_models=False)
    cfg.user_weights, cfg.user_target = {}, {}
    cfg.training.steps = 2
    cfg.training.micro_batch_size = 1  # the fixture's 2 valid rows: 1 trains, 1 is held out
    cfg.eval = ev.EvalConfig(judge_model="tiny", prompts_file=str(prompts), arms=[],
                             max_new_tokens=8, samples_per_prompt=1, n_boot=50)
    result = run_soups(cfg)
    assert result.win_rates["names"] == ["P-Soups", "SFT", "Prompting"]
    assert set(result.sft_scores) == {"P1A", "quality"}  # the judge's keys, not the world's
    assert 1.0 <= result.sft_scores["P1A"] <= 5.0
    report = result.report_path.read_text()
    assert "LM judge `tiny` in scoring mode" in report and "2 held-out prompts" in report


def test_a_combination_with_a_failed_preference_is_left_out_whole():
    kept, excluded = usable_combinations([["P2A", "P3A"], ["P2B", "P3B"]], ["P2A", "P2B", "P3A"])
    assert kept == [("P2A", "P3A")] and excluded == [("P2B", "P3B")]


def test_user_weights_are_validated_before_any_training():
    with pytest.raises(ValueError, match="sum to 1"):
        SoupsConfig(user_weights={"P1A": 0.5, "P2A": 0.2}).validate()
    with pytest.raises(ValueError, match="unknown"):
        SoupsConfig(user_weights={"P7Q": 1.0}).validate()
    with pytest.raises(ValueError, match=">= 0"):
        SoupsConfig(user_weights={"P1A": 1.5, "P2A": -0.5}).validate()


def test_training_key_ignores_evaluation_but_not_training():
    from raypref.experiments.soups.training import training_key

    base = SoupsConfig()
    other_eval = SoupsConfig()
    other_eval.eval.n_prompts = 3
    other_training = SoupsConfig()
    other_training.training.beta = 0.1
    assert training_key(base) == training_key(other_eval)
    assert training_key(base) != training_key(other_training)
    # pool pairs: the pool's settings and its floor draw the pairs, not the folder it is kept in
    pooled = SoupsConfig(pairs_source="pool")
    moved, floored = SoupsConfig(pairs_source="pool"), SoupsConfig(pairs_source="pool")
    moved.pool.dir, floored.pool.min_quality = "/elsewhere/pools", 0.4
    assert training_key(pooled) == training_key(moved) != training_key(floored)


def test_real_preference_files_are_validated_and_quarantined(tmp_path):
    """The soups job's real-data path: bad rows of a P-Soups file are quarantined with their
    line; over the limit the job stops before any training."""
    from raypref.data.quarantine import QuarantineExceeded
    from raypref.experiments.soups.preferences import file_data

    fixture = Path(__file__).parent / "fixtures" / "P1A.json"  # 3 rows, one with a blank response
    cfg = SoupsConfig(output_dir=str(tmp_path), preferences=["P1A"], combinations=[["P1A"]],
                      baselines=["sft"], psoups_files={"P1A": str(fixture)}, max_quarantine_fraction=0.5,
                      training=DPOConfig(micro_batch_size=1))
    data = file_data(cfg)
    train, held_out = data.train["P1A"], data.held_out["P1A"]
    assert len(train) + len(held_out) == 2
    entries = [json.loads(line) for line in (tmp_path / "quarantine" / "P1A.jsonl").read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["reason"] == "empty_text"

    cfg.max_quarantine_fraction = 0.2  # 1 of 3 rows is bad: over the limit
    with pytest.raises(QuarantineExceeded, match="P1A"):
        file_data(cfg)

    # too few training pairs for one micro-batch: refused here, naming the file and the setting
    cfg.max_quarantine_fraction = 0.5
    cfg.training.micro_batch_size = 2
    with pytest.raises(ValueError, match=r"psoups_files.P1A=.*1 training pairs.*micro_batch_size=2"):
        file_data(cfg)


def test_simulated_pairs_and_generations_must_fit_the_training_and_the_judges():
    with pytest.raises(ValueError, match="pairs_per_preference=4: fewer than one step"):
        SoupsConfig(pairs_per_preference=4).validate()
    world = World(seed=0)
    low, high = world.verbosity_words()
    assert 20 < low < high <= 128  # the default max_new_tokens can reach verbosity 1
    short = ev.EvalConfig(max_new_tokens=int(low))
    with pytest.raises(ValueError, match=r"eval.max_new_tokens=\d+: the world's verbosity judge"):
        ev.make_scorer(short, world, ["P2A", "P3A"])
    ev.make_scorer(short, world, ["P1A", "P3A"])  # no verbosity preference: nothing to cut
    ev.make_scorer(ev.EvalConfig(), world, ["P2A"])


def test_every_arm_labels_the_same_candidates_and_held_out_pairs_use_test_prompts():
    from raypref.experiments.soups.preferences import simulated_data

    world = World(seed=0)
    cfg = SoupsConfig(preferences=["P2A", "P2B", "P3A"], combinations=[["P2A", "P3A"], ["P2B", "P3A"]],
                      pairs_per_preference=30)
    data = simulated_data(cfg, world, seed=3)
    p2a, p2b, pmorl = data.train["P2A"], data.train["P2B"], data.pmorl
    assert len(p2a) == len(p2b) == len(pmorl) == 30
    for i, (a, b, m) in enumerate(zip(p2a, p2b, pmorl)):
        assert a.prompt == b.prompt and {a.chosen, a.rejected} == {b.chosen, b.rejected}
        combo = cfg.combinations[i % 2]
        assert m.prompt == f"{a.prompt} {world.preference_instruction(combo)}"
        assert {m.chosen, m.rejected} == {a.chosen, a.rejected} and m.user_text == "+".join(combo)
    # opposite preferences of one dimension order (almost) every shared pair oppositely
    opposite = np.mean([a.chosen == b.rejected for a, b in zip(p2a, p2b)])
    assert opposite > 0.7
    test_prompts = set(world.prompt_pool("test"))
    assert data.held_out["P2A"] and all(r.prompt in test_prompts for r in data.held_out["P2A"])
    assert not test_prompts & {r.prompt for r in p2a}
    other_seed = simulated_data(cfg, world, seed=4)
    assert [r.prompt for r in other_seed.train["P2A"]] != [r.prompt for r in p2a]


def test_training_jobs_are_separate_runs_per_seed_with_their_own_seed(tmp_path):
    from raypref.experiments.soups.preferences import simulated_data
    from raypref.experiments.soups.training import training_jobs

    cfg = SoupsConfig(seed=5, seeds=2, preferences=["P2A", "P2B"], combinations=[["P2A"], ["P2B"]],
                      pairs_per_preference=8, output_dir=str(tmp_path))
    world = World(seed=0)
    data = [simulated_data(cfg, world, cfg.seed + k) for k in range(cfg.seeds)]
    jobs = training_jobs(cfg, str(tmp_path / "sft"), data, str(tmp_path / "runs"))
    assert sorted(jobs) == ["P-MORL-s0", "P-MORL-s1", "P2A-s0", "P2A-s1", "P2B-s0", "P2B-s1"]
    for name, (spec, runner_cfg) in jobs.items():
        k = int(name[-1])
        assert runner_cfg.name == name and runner_cfg.seed == spec.seed == 5 + k
    assert jobs["P2A-s0"][0].pairs != jobs["P2A-s1"][0].pairs


def test_cause_line_keeps_the_whole_final_exception():
    from raypref.train.concurrent import RunOutcome
    from raypref.experiments.soups.training import cause_line

    long = "x" * 700
    details = ("Traceback (most recent call last):\n  File \"a.py\", line 1, in f\n    g()\n"
               "ValueError: inner\n\nThe above exception was the direct cause of the following exception:\n\n"
               "Traceback (most recent call last):\n  File \"b.py\", line 2, in h\n    raise X\n"
               f"ray.train.TrainingFailedError: Training failed.\n[Rank 0] worker died: {long}\n")
    outcome = RunOutcome("P1A-s0", False, 1.0, error="cut"[:500], details=details)
    assert cause_line(outcome) == f"ray.train.TrainingFailedError: Training failed. | [Rank 0] worker died: {long}"
    assert cause_line(RunOutcome("x", False, 0.0, error="driver died")) == "driver died"


def _rows(values, quality=0.8):
    return [{"verbosity": v, "quality": quality} for v in values]


def test_compare_pools_seeds_with_intervals_tables_and_quality_lines():
    from raypref.experiments.soups.compare import compare

    table = {"P2B": ("verbosity", 1)}
    combo = ("P2B",)
    rng = np.random.default_rng(0)
    per_seed = []
    for k in range(2):
        sft = rng.uniform(0.2, 0.4, 10)
        per_seed.append({"P-Soups": {combo: _rows(sft + 0.3, quality=0.5)},
                         "SFT": {combo: _rows(sft)},
                         "Prompting": {combo: _rows(sft + 0.3 + rng.normal(0, 0.2, 10))}})
    sft_rows = [m["SFT"][combo] for m in per_seed]
    c = compare(per_seed, sft_rows, table, n_prompts=5, samples_per_prompt=2, tol=0.05,
                margin=0.1, n_boot=300)
    soups_vs_sft = c.intervals[("P-Soups", "SFT")]
    assert soups_vs_sft.estimate == 1.0 and soups_vs_sft.wins == 20
    prompting = c.intervals[("P-Soups", "Prompting")]
    assert prompting.low <= prompting.estimate <= prompting.high and prompting.low < prompting.high
    assert c.averages["P-Soups"] == pytest.approx(np.mean([1.0, prompting.estimate]))
    assert [r.battle for r in c.wlt] == ["P-Soups vs SFT", "P-Soups vs Prompting"]
    assert c.wlt[0].cells == {"B": (20, 0, 0)}
    assert c.criteria["SFT"] == {"P2B": 1.0}
    assert c.quality["P-Soups"] == pytest.approx(0.5) and c.quality["SFT"] == pytest.approx(0.8)
    assert c.quality_vs_sft["P-Soups"] == 0.0
    assert len(c.quality_lines) == 1 and c.quality_lines[0].startswith("P-Soups: quality 0.500")


def test_a_sweep_is_monotone_only_if_quality_holds_along_it():
    from raypref.experiments.soups.compare import sweep_over_seeds

    def seed(scores, quality):
        return {"style": {"attribute": "style", "raised_by": "P3A", "lowered_by": "P3B",
                          "weights": [0, 0.5, 1], "scores": scores, "quality": quality}}
    holds = sweep_over_seeds([seed([0.1, 0.2, 0.3], [0.8, 0.8, 0.78]),
                              seed([0.1, 0.25, 0.4], [0.8, 0.79, 0.8])], 0.8, 0.05)["style"]
    assert holds["monotonic"] and holds["scores"] == pytest.approx([0.1, 0.225, 0.35])
    degenerate = sweep_over_seeds([seed([0.1, 0.2, 0.3], [0.8, 0.7, 0.5])], 0.8, 0.05)["style"]
    assert degenerate["rises"] and not degenerate["quality_holds"] and not degenerate["monotonic"]


def test_quality_at_a_matched_attribute_level_discounts_only_the_judges_lean():
    from raypref.eval.quality import attribute_matched_quality, base_quality_at

    # the base's own answers: judged quality rises with the attribute (0.4 at 0, 0.7 at 1)
    ref_values = np.linspace(0.0, 1.0, 201)
    ref_quality = 0.4 + 0.3 * ref_values
    assert base_quality_at([0.2, 0.8], ref_values, ref_quality, k=5) == pytest.approx([0.46, 0.64])
    sft_values, sft_quality = np.full(8, 0.8), 0.64
    # a point that writes at 0.2 as well as the base does there, and one 0.1 worse than that
    as_good, worse = 0.46, 0.36
    matched = attribute_matched_quality([as_good, worse, sft_quality], [np.full(8, 0.2)] * 2 + [sft_values],
                                        sft_values, ref_values, ref_quality, k=5)
    assert matched == pytest.approx([0.64, 0.54, 0.64])
    with pytest.raises(ValueError, match="one quality per reference value"):
        base_quality_at([0.5], ref_values, ref_quality[:-1])
    with pytest.raises(ValueError, match="k=500 must be in 1..201"):
        base_quality_at([0.5], ref_values, ref_quality, k=500)


def test_a_sweep_holds_quality_at_a_matched_attribute_only_with_its_answers_and_a_reference():
    from raypref.experiments.soups.compare import sweep_over_seeds

    ref_values = np.linspace(0.0, 1.0, 201)
    reference = {"verbosity": ref_values, "quality": 0.4 + 0.3 * ref_values}

    def seed(quality, with_answers=True):
        row = {"attribute": "verbosity", "raised_by": "P2B", "lowered_by": "P2A",
               "weights": [0, 0.5, 1], "scores": [0.2, 0.5, 0.8], "quality": quality}
        if with_answers:
            row.update(answer_values=[[0.2] * 4, [0.5] * 4, [0.8] * 4], sft_values=[0.8] * 4)
        return {"informativeness": row}
    # the short end loses 0.18 of judged quality, as the base's own short answers do
    follows = sweep_over_seeds([seed([0.46, 0.55, 0.64])], 0.64, 0.05, reference)["informativeness"]
    assert not follows["quality_holds"] and not follows["monotonic"]
    assert follows["quality_matched"] == pytest.approx([0.64, 0.64, 0.64], abs=0.002)
    assert follows["quality_holds_matched"] and follows["monotonic_matched"]
    # with the prompts' count, the noise of each point: 4 answers = 2 prompts x 2 samples
    noisy = sweep_over_seeds([seed([0.46, 0.55, 0.64])], 0.64, 0.05, n_prompts=2, n_boot=50)["informativeness"]
    assert noisy["p_rises"] == 1.0 and noisy["intervals"][0] == pytest.approx((0.2, 0.2))
    # 0.1 worse than the base at the short end: fails at a matched level too
    worse = sweep_over_seeds([seed([0.36, 0.55, 0.64])], 0.64, 0.05, reference)["informativeness"]
    assert not worse["quality_holds_matched"] and not worse["monotonic_matched"]
    # no reference, or a seed without its answers' values (an older run): no matched fields
    assert "quality_matched" not in sweep_over_seeds([seed([0.46, 0.55, 0.64])], 0.64, 0.05)["informativeness"]
    assert "quality_matched" not in sweep_over_seeds(
        [seed([0.46, 0.55, 0.64]), seed([0.46, 0.55, 0.64], with_answers=False)], 0.64, 0.05,
        reference)["informativeness"]


def test_sweep_noise_intervals_pair_the_points_over_prompts():
    from raypref.eval.intervals import prompt_groups, sweep_bootstrap

    rng = np.random.default_rng(0)
    n_prompts, samples = 30, 2
    groups = prompt_groups(n_prompts, samples)
    prompt_effect = rng.normal(0, 1.0, n_prompts)[groups]  # large, shared by every weight
    steps = np.array([0.0, 0.2, 0.4])
    points = [prompt_effect + step + rng.normal(0, 0.05, len(groups)) for step in steps]
    intervals, p_rises = sweep_bootstrap(points, groups, n_boot=500)
    # each mean's interval is wide (the prompts' spread) ...
    assert all(hi - lo > 0.3 and lo < np.mean(p) < hi for (lo, hi), p in zip(intervals, points))
    # ... but the steps are sure, because every weight answers the same resampled prompts
    assert p_rises == 1.0
    flat = [prompt_effect + rng.normal(0, 0.05, len(groups)) for _ in steps]
    assert 0.0 < sweep_bootstrap(flat, groups, n_boot=500)[1] < 0.5
    with pytest.raises(ValueError, match="one group per row"):
        sweep_bootstrap(points, groups[:-1])


def test_scorers_add_quality_and_the_lm_judge_scores_by_preference_name():
    world = World(seed=0)
    prompt = world.prompts(1, split="test")[0]
    text = world.sample_response(prompt, np.random.default_rng(0)).text
    world_scores = ev.make_scorer(ev.EvalConfig(), world, ["P2A"]).score([text], [prompt])[0]
    assert world_scores["quality"] == world.quality(text, prompt) and "verbosity" in world_scores

    judge = ev.make_scorer(ev.EvalConfig(judge_model="tiny"), world, ["P2A", "P3B"])
    assert isinstance(judge, ev.JudgeScorer) and judge.texts["P2A"] == psoup_instruction("P2A")
    rows = judge.score([text, text + " more words"], [prompt, prompt])
    assert [sorted(r) for r in rows] == [["P2A", "P3B", "quality"]] * 2
    for row in rows:
        assert 1.0 <= row["P2A"] <= 5.0 and 0.0 <= row["quality"] <= 1.0
    assert judge.table(["P2A"]) == {"P2A": ("P2A", 1)} and judge.sweep_key("P2B") == "P2B"


def psoup_instruction(name):
    return psoups_profile(name).instruction


def test_the_7b_config_is_judged_by_a_real_lm_on_a_shared_prompts_file():
    from raypref.config import from_dict, load_yaml

    repo = Path(__file__).resolve().parents[1]
    cfg = from_dict(SoupsConfig, load_yaml(repo / "configs" / "soups-7b-8gpu.yaml"))
    cfg.validate()
    assert cfg.eval.judge_model not in ("", "tiny")
    assert cfg.eval.prompts_file.startswith("/mnt/shared/")
    cfg.eval.judge_model = ""
    with pytest.raises(ValueError, match="eval.judge_model"):
        cfg.validate()


def test_arm_names_become_mlflow_metric_names():
    from raypref.experiments.soups.compare import Comparison
    from raypref.experiments.soups.run import _log_summary_metrics, metric_name
    from raypref.eval.intervals import Interval

    assert metric_name("P-Soups+instr") == "P-Soups_instr"
    assert metric_name("P-Soups (A/B avg)") == "P-Soups_A_B_avg"
    c = Comparison(quality={"SFT": 0.8, "P-Soups (A/B avg)": 0.7},
                   intervals={("P-Soups", "P-Soups+instr"): Interval(0.6, 0.5, 0.7, 0.95, 6, 4, 0)})
    with mlflow.start_run() as run:
        _log_summary_metrics(c, {})
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    assert metrics["quality.P-Soups_A_B_avg"] == 0.7 and metrics["win_rate.P-Soups_instr.low"] == 0.5


def test_runs_that_fit_the_cluster_by_cpus_and_gpus():
    from raypref.experiments.soups.training import runs_that_fit
    from raypref.train.runner import Resources

    assert runs_that_fit(Resources(cpus_per_worker=0.25), {"CPU": 2.0}) == 8
    assert runs_that_fit(SoupsConfig().resources, {"CPU": 2.0}) == 2  # the default here
    assert runs_that_fit(Resources(num_workers=2, cpus_per_worker=1.0), {"CPU": 3.0}) == 1
    assert runs_that_fit(Resources(cpus_per_worker=4.0), {"CPU": 2.0}) == 1  # never 0
    gpu = Resources(num_workers=2, cpus_per_worker=2.0, use_gpu=True)
    assert runs_that_fit(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4  # GPUs bind first


def test_train_concurrently_keeps_at_most_max_concurrent_runs_going(timed_runs):
    """Every run is started, in order, each as soon as a slot frees; never more than the cap.
    Judged from the driver's submissions against the runs' own end times (a run writes its end
    before it returns, so the driver cannot see it end earlier): worker start-up delays on a
    busy machine cannot make this flaky."""
    import raypref.train.concurrent as concurrent

    jobs = {f"r{i}": (0.6 if i % 2 else 0.3, None) for i in range(7)}
    done = []
    outcomes = concurrent.train_concurrently(jobs, on_done=lambda o: done.append(o.name), tick_seconds=0.1,
                                             max_concurrent=3)
    assert set(outcomes) == set(jobs) == set(done) and all(o.ok for o in outcomes.values())
    submitted = timed_runs.submitted
    assert [name for name, _ in submitted] == list(jobs)  # in order, each once
    ends = timed_runs.ends(jobs)
    first_end = min(ends.values())
    assert all(t < first_end for _, t in submitted[:3])  # the cap is reached at once
    for k, (_, t) in enumerate(submitted[3:], start=3):  # and never passed
        running = sum(ends[n] > t for n, _ in submitted[:k])
        assert running <= 2, f"submission {k} found {running} runs still going"
    with pytest.raises(ValueError, match="max_concurrent=-1"):
        concurrent.train_concurrently(jobs, max_concurrent=-1)


def _assert_saved_soups_are_their_named_merges(out: Path, merged: Path, saved: list[str]) -> None:
    """Each saved soup's name, its soup_weights.json and its weights agree: the weights are
    Σ wᵢ · (policy i materialized by peft), with wᵢ read from the name (P2A_0p700 = 0.7)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from raypref.models.factory import load_pretrained
    from raypref.models.merge import merge_full

    for name in saved:
        named = {part.split("_")[0]: float(part.split("_")[1].replace("p", ".")) for part in name.split("-")[1:]}
        assert json.loads((merged / name / "soup_weights.json").read_text()) == pytest.approx(named)
        full = {}
        for pref in named:
            adapter, = out.glob(f"runs/*/{pref}-s0/final")
            base, _ = load_pretrained(json.loads((adapter / "soup_policy.json").read_text())["sft_dir"])
            full[pref] = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
        expected = merge_full(full, named)
        got = load_file(str(merged / name / "model.safetensors"))
        for key, tensor in got.items():
            assert torch.allclose(tensor, expected[key], atol=1e-5), f"{name}: {key} differs"
