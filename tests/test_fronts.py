"""jobs/fronts.py: the exact 2-D hypervolume, its bootstrap interval over prompts, the config's
checks, P-MORL's weighted labels, the budgets, and one tiny run end to end."""
import json
from pathlib import Path

import numpy as np
import pytest

from raypref.experiments.fronts import (FrontsConfig, budget, dominance, front_intervals, hypervolume_2d,
                                        weight_grid)


# ---------------------------------------------------------------- hypervolume, by hand

def test_hypervolume_of_a_staircase_by_hand():
    # boxes from (0, 0): x in [0,3] up to y 1, [0,2] from 1 to 2, [0,1] from 2 to 3: 3 + 2 + 1
    assert hypervolume_2d([(1, 3), (2, 2), (3, 1)], (0, 0)) == pytest.approx(6.0)
    # order does not matter; a dominated point, a duplicate and a tie on x add nothing
    assert hypervolume_2d([(3, 1), (1, 1), (2, 2), (1, 3), (2, 2), (2, 1.5)], (0, 0)) == pytest.approx(6.0)
    # one point: its box; reference not at the origin: (2-1) x (3-1)
    assert hypervolume_2d([(2, 3)], (1, 1)) == pytest.approx(2.0)
    # (0.5, 4) is left of the reference: it adds nothing, (3, 0.5) is below it
    assert hypervolume_2d([(0.5, 4), (2, 3), (3, 0.5)], (1, 1)) == pytest.approx(2.0)
    # a point on the reference's edge has no area; no points, no area
    assert hypervolume_2d([(1, 5), (5, 1)], (1, 1)) == 0.0
    assert hypervolume_2d([], (0, 0)) == 0.0


def test_hypervolume_of_two_overlapping_boxes_by_hand():
    # (4, 1) and (1, 4) from (0, 0): 4 + 4 - 1 (their overlap [0,1]x[0,1])
    assert hypervolume_2d([(4, 1), (1, 4)], (0, 0)) == pytest.approx(7.0)
    # adding (2, 2) covers [1,2]x[1,2] more
    assert hypervolume_2d([(4, 1), (1, 4), (2, 2)], (0, 0)) == pytest.approx(8.0)
    # negative coordinates and a negative reference work alike (shifted by (-1, -1))
    assert hypervolume_2d([(3, 0), (0, 3), (1, 1)], (-1, -1)) == pytest.approx(8.0)


# ---------------------------------------------------------------- bootstrap over prompts

def _one_point(mu, n, rng):
    """A method with one point whose per-prompt scores are N(mu, 1) in each objective."""
    return rng.normal(mu, 1.0, size=(1, n, 2))


@pytest.mark.parametrize("level", [0.95, 0.5])
def test_interval_has_its_nominal_coverage(level):
    """With a fixed reference (0, 0) one point's hypervolume is mean_x · mean_y, truly 2 x 3 = 6:
    over 200 synthetic experiments of 150 prompts the interval covers 6 about ``level`` of the time
    (a 50% interval would fail the 95% check and the reverse)."""
    covered = 0
    for i in range(200):
        rng = np.random.default_rng(1000 + i)
        scores = rng.normal(0.0, 1.0, size=(1, 150, 2)) + np.array([2.0, 3.0])
        iv = front_intervals({"a": scores}, reference=(0.0, 0.0), n_boot=400, level=level, seed=i)
        h = iv["hypervolume"]["a"]
        assert h["low"] <= h["estimate"] <= h["high"]
        covered += h["low"] <= 6.0 <= h["high"]
    assert abs(covered / 200 - level) < 0.07, f"coverage {covered / 200:.3f} for level {level}"


def test_interval_reference_from_the_lowest_point_and_differences():
    """Reference () = the lowest mean per objective over every point and the base; the estimate is
    the hypervolume of the full-sample means; the difference to the first method has its own
    interval; the same seed gives the same intervals."""
    rng = np.random.default_rng(0)
    a = np.stack([rng.normal(m, 0.1, size=(40, 2)) for m in ([1, 3], [2, 2], [3, 1])])
    b = np.stack([rng.normal(m, 0.1, size=(40, 2)) for m in ([0.5, 2], [2, 0.5])])
    base = rng.normal([0.2, 0.3], 0.1, size=(40, 2))
    iv = front_intervals({"a": a, "b": b}, base, n_boot=300, seed=3)
    means_a, means_b = a.mean(axis=1), b.mean(axis=1)
    ref = np.min(np.vstack([means_a, means_b, base.mean(axis=0)[None]]), axis=0)
    assert iv["reference"] == pytest.approx(ref.tolist())
    assert iv["hypervolume"]["a"]["estimate"] == pytest.approx(hypervolume_2d(means_a, ref))
    assert iv["hypervolume"]["b"]["estimate"] == pytest.approx(hypervolume_2d(means_b, ref))
    diff = iv["minus_a"]["b"]
    assert diff["estimate"] < 0 and diff["high"] < 0  # a's front clearly holds more
    assert front_intervals({"a": a, "b": b}, base, n_boot=300, seed=3) == iv
    with pytest.raises(ValueError, match="same prompts"):
        front_intervals({"a": a, "b": b[:, :30]})


def test_dominance_names_the_points_a_method_beats():
    points = [{"method": "x", "w": 0, "u": 1.0, "v": 1.0}, {"method": "y", "w": 0, "u": 0.5, "v": 1.0},
              {"method": "y", "w": 1, "u": 2.0, "v": 0.0}, {"method": "x", "w": 1, "u": 1.0, "v": 1.0}]
    assert dominance(points, ["x", "y"], ["u", "v"]) == {"x": ["y@0"], "y": []}


# ---------------------------------------------------------------- config and budget

@pytest.mark.parametrize("overrides, message", [
    (dict(objectives=["verbosity"]), r"FrontsConfig\.objectives=\['verbosity'\]: must be two distinct"),
    (dict(objectives=["verbosity", "friendliness"]), r"FrontsConfig\.objectives=.*'world' judges"),
    (dict(judges="text"), r"FrontsConfig\.base_policy='': judges 'text' needs a base"),
    (dict(judges="llm"), r"FrontsConfig\.judges='llm': must be one of"),
    (dict(methods=["psoups", "ric"]), r"FrontsConfig\.methods=.*must be distinct names"),
    (dict(n_weights=3), r"FrontsConfig\.n_weights=3: must be >= 5"),
    (dict(run_name=".."), r"FrontsConfig\.run_name=.*one folder name"),
    (dict(run_name="../elsewhere"), r"FrontsConfig\.run_name=.*one folder name"),
    (dict(pairs_per_policy=4), r"FrontsConfig\.pairs_per_policy=4: must hold at least one step"),
    (dict(pairs_per_policy=16), r"FrontsConfig\.pairs_per_policy=16: DPA's share"),
    (dict(reference=[0.0]), r"FrontsConfig\.reference=\[0\.0\]: must be \[\]"),
    (dict(level=1.0), r"FrontsConfig\.level=1\.0: must be in \(0, 1\)"),
    (dict(eval_prompts=1), r"FrontsConfig\.eval_prompts=1"),
])
def test_config_errors_name_the_field(overrides, message):
    FrontsConfig().validate()
    with pytest.raises(ValueError, match=message):
        FrontsConfig(**overrides).validate()


def test_default_objectives_and_weights():
    assert FrontsConfig().resolved_objectives() == ["verbosity", "style"]
    assert FrontsConfig(judges="text").resolved_objectives() == ["verbosity", "friendliness"]
    assert weight_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_every_trained_method_has_the_same_budget_by_default():
    """P-Soups and P-MORL label 2N pairs (4N judged responses), DPA judges 4N sampled responses; each
    takes 2S optimizer steps of the same micro-batch."""
    cfg = FrontsConfig()
    b = budget(cfg)
    n, s = cfg.pairs_per_policy, cfg.training.steps
    for m in ("psoups", "pmorl", "dpa"):
        assert b[m]["judged_responses"] == 4 * n and b[m]["steps"] == 2 * s
        assert b[m]["examples_per_step"] == cfg.training.micro_batch_size
    assert b["psoups"]["labelled_pairs"] == b["pmorl"]["labelled_pairs"] == 2 * n
    assert b["prompting"]["steps"] == 0


def test_pmorl_weights_label_as_the_preference_they_weigh_fully():
    """P-MORL's weighted labeller with weights (1, 0) orders every pair as the first preference
    alone does (the same label-noise draws), with (0, 1) as the second; mixed weights follow the
    weighted latent rewards, and each pair carries the text that states its weights."""
    from raypref.data.labelling import (candidate_pairs, label_pairs, preference_labeller, preference_reward,
                                        weighted_labelled_pairs)
    from raypref.data.world import World

    world = World(seed=0, label_noise=0.2)
    pairs = candidate_pairs(world, 60, [1, 0])
    prefs = ["P2B", "P3A"]
    for k, pref in enumerate(prefs):
        weights = [[1.0 - k, float(k)]] * len(pairs)
        weighted = weighted_labelled_pairs(world, pairs, prefs, weights, [1, 0], user_texts=["t"] * len(pairs))
        alone = label_pairs(world, pairs, preference_labeller([pref]), [1, 0])
        assert [r.chosen for r in weighted] == [r.chosen for r in alone]
        assert sum(r.chosen != p.first.text for r, p in zip(weighted, pairs)) not in (0, len(pairs))
    clean = World(seed=0, label_noise=0.0)
    weights = [[0.3, 0.7]] * len(pairs)
    texts = [f"w{i}" for i in range(len(pairs))]
    weighted = weighted_labelled_pairs(clean, pairs, prefs, weights, [1, 0], user_texts=texts)
    for r, p in zip(weighted, pairs):
        reward = [0.3 * preference_reward("P2B", x.latent) + 0.7 * preference_reward("P3A", x.latent)
                  for x in (p.first, p.second)]
        if reward[0] != reward[1]:
            assert r.chosen == (p.first if reward[0] > reward[1] else p.second).text
    assert [r.user_text for r in weighted] == texts
    with pytest.raises(ValueError, match="one weight per preference"):
        weighted_labelled_pairs(world, pairs[:1], prefs, [[1.0]], 0, user_texts=["t"])


# ---------------------------------------------------------------- end to end, tiny

@pytest.fixture(scope="module")
def untrained_base(tmp_path_factory):
    """An untrained one-layer GPT-2 over the world's vocabulary (the job adds the instructions' tokens)."""
    import torch

    from raypref.data.world import World
    from raypref.models.factory import ModelConfig, build_policy, build_tokenizer, save_pretrained_safetensors

    tokenizer = build_tokenizer(ModelConfig(), World(seed=0).vocabulary())
    torch.manual_seed(0)
    model = build_policy(ModelConfig(n_layer=1, n_embd=32, n_head=2), tokenizer)
    return str(save_pretrained_safetensors(model, tokenizer, tmp_path_factory.mktemp("base") / "base"))


@pytest.mark.slow
def test_fronts_job_end_to_end_on_a_tiny_budget(ray_local, untrained_base, tmp_path):
    """jobs/fronts.py's library entry, every method on a few steps: the plot, the table and the
    summary; each hypervolume is the exact one of its points w.r.t. the stated reference, inside its
    interval; the budgets match; MLflow holds the hypervolumes."""
    import mlflow

    from raypref.config import parse_args
    from raypref.experiments.fronts import run_fronts

    argv = ["--base_policy", untrained_base, "--output_dir", str(tmp_path), "--pairs_per_policy", "16",
            "--training.steps", "3", "--training.micro_batch_size", "4", "--training.warmup_steps", "0",
            "--resources.checkpoint_every", "3", "--resources.cpus_per_worker", "0.5",
            "--dpa_iterations", "1", "--dpa_samples", "2", "--dpa_directions_per_prompt", "2",
            "--eval_prompts", "4", "--eval_samples", "1", "--n_boot", "200"]
    result = run_fronts(parse_args(FrontsConfig, argv))
    s, out = result.summary, result.output_dir
    assert s["objectives"] == ["verbosity", "style"] and s["methods"] == ["psoups", "dpa", "pmorl", "prompting"]
    assert {m: b["judged_responses"] for m, b in s["budget"].items()} == {
        "psoups": 64, "dpa": 64, "pmorl": 64, "prompting": 0}
    points = s["points"]
    assert len(points) == 1 + 4 * 5 and points[0]["method"] == "base"
    hv = s["hypervolume"]
    for m in s["methods"]:
        mine = [(p["verbosity"], p["style"]) for p in points if p["method"] == m]
        assert [p["w"] for p in points if p["method"] == m] == [0.0, 0.25, 0.5, 0.75, 1.0]
        iv = hv["hypervolume"][m]
        assert iv["estimate"] == pytest.approx(hypervolume_2d(mine, hv["reference"]))
        assert iv["low"] <= iv["estimate"] <= iv["high"]
    lowest = np.min([[p["verbosity"], p["style"]] for p in points], axis=0)
    assert hv["reference"] == pytest.approx(lowest.tolist())
    assert (out / "fronts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "points.csv").read_text().splitlines()[0] == "method,w,verbosity,style,quality,words"
    assert "| P-Soups |" in (out / "points.md").read_text()
    assert json.loads((out / "summary.json").read_text())["hypervolume"] == json.loads(json.dumps(hv))
    metrics = mlflow.MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics
    assert metrics["hypervolume.psoups"] == pytest.approx(hv["hypervolume"]["psoups"]["estimate"])
    assert Path(out / "runs" / "DPA").is_dir() and Path(out / "runs" / "P-MORL").is_dir()


def test_text_fronts_pool_must_read_the_fronts_prompts():
    """judges "text": the pool's prompts are the fronts' prompts file, or every method would not
    learn from the same questions; the pool's own settings are checked too."""
    from raypref.recipes.pool import PoolConfig

    FrontsConfig(judges="text", base_policy="smollm2-135m-instruct").validate()
    with pytest.raises(ValueError, match=r"FrontsConfig\.pool\.prompts='q\.txt': must be prompts_file=''"):
        FrontsConfig(judges="text", base_policy="smollm2-135m-instruct", pool=PoolConfig(prompts="q.txt")).validate()
    with pytest.raises(ValueError, match=r"temperature"):
        FrontsConfig(judges="text", base_policy="smollm2-135m-instruct", pool=PoolConfig(temperature=0.0)).validate()
    FrontsConfig(pool=PoolConfig(prompts="q.txt")).validate()  # the world's fronts read no pool
