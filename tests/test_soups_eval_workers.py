"""The soups job's evaluation on Ray workers: the same numbers as in the driver's process, a GPU
asked for where the cluster has one, and training runs that start as the cluster grows."""
from pathlib import Path

import numpy as np
import pytest
import torch

from raypref.data.world import World
from raypref.experiments.soups import evaluate as ev
from raypref.experiments.soups.config import SoupsConfig
from raypref.experiments.soups.seed_eval import (actor_options, evaluate_on_workers, evaluate_seed,
                                                 heldout_accuracy)
from raypref.models.factory import (LoraSettings, ModelConfig, add_lora, build_policy, build_tokenizer,
                                    load_pretrained, save_pretrained_safetensors)
from raypref.train.runner import Resources

PREFS = ["P1A", "P1B", "P3A", "P3B"]  # no verbosity preference: short generations are allowed


@pytest.fixture(scope="module")
def base_and_adapters(tmp_path_factory):
    """An untrained 1-layer GPT-2 base, a random non-zero LoRA adapter per preference (so every
    soup differs from the base and from each other), and a saved LM judge folder."""
    root = tmp_path_factory.mktemp("soups-workers")
    world = World(seed=0)
    tokenizer = build_tokenizer(ModelConfig(), world.vocabulary())
    torch.manual_seed(0)
    base = save_pretrained_safetensors(build_policy(ModelConfig(n_layer=1, n_embd=32, n_head=2), tokenizer),
                                       tokenizer, root / "base")
    adapters = {}
    for i, pref in enumerate(PREFS):
        torch.manual_seed(10 + i)
        model = add_lora(load_pretrained(base)[0], LoraSettings())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.3)
        model.save_pretrained(root / pref)  # the adapter alone (safetensors)
        adapters[pref] = root / pref
    from raypref.eval.llm_judge import JudgeConfig, ScoringJudge
    torch.manual_seed(1)
    judge = ScoringJudge.from_config(JudgeConfig(), vocabulary=world.vocabulary())
    judge_dir = save_pretrained_safetensors(judge.model, judge.tokenizer, root / "judge")
    return str(base), adapters, str(judge_dir)


@pytest.mark.parametrize("judge", ["world", "lm"])
def test_evaluation_on_workers_equals_the_in_process_path(base_and_adapters, tmp_path, ray_local, judge):
    """Same seeds, same generations, scores, sweeps, held-out accuracy and merged soups, whether
    a seed is evaluated by its worker actor or in this process (the path the driver used)."""
    base, adapters, judge_dir = base_and_adapters
    world = World(seed=0)
    cfg = SoupsConfig(output_dir=str(tmp_path), preferences=PREFS,
                      combinations=[["P1A", "P3A"]], baselines=["sft", "prompting"],
                      user_weights={"P1A": 0.75, "P3A": 0.25},
                      eval=ev.EvalConfig(n_prompts=3, samples_per_prompt=2, max_new_tokens=4, batch_size=2,
                                         weight_grid=[0.0, 1.0], n_boot=10,
                                         judge_model=judge_dir if judge == "lm" else ""))
    cfg.validate()
    prompts = ev.eval_prompts(cfg.eval, world)
    combos = [tuple(c) for c in cfg.combinations]
    rng = np.random.default_rng(0)
    held_out = {p: world.pairs_for_preference(p, 3, rng) for p in PREFS}

    scorer = ev.make_scorer(cfg.eval, world, PREFS)
    here = evaluate_seed(cfg, 0, base, adapters, scorer, world, prompts, PREFS, combos, False,
                         models_dir=tmp_path / "here")
    here_accuracy = {p: heldout_accuracy(cfg, base, adapters[p], held_out[p], p) for p in PREFS}

    accuracy, seeds = evaluate_on_workers(cfg, base, world, [adapters], [held_out], prompts, PREFS, combos,
                                          False, tmp_path / "workers")
    there = seeds[0]
    assert accuracy == [here_accuracy]
    for key in ("methods", "sft", "sweep", "samples", "soups"):
        assert there[key] == here[key], key
    # the arms really differ (a comparison of identical constants would prove nothing)
    texts = [t for group in here["samples"].values() for t in group]
    assert len(set(texts)) > 1
    first = here["methods"]["P-Soups"][combos[0]]
    assert first != here["methods"]["Prompting"][combos[0]]
    if judge == "lm":
        assert set(first[0]) == set(PREFS) | {"quality"} and 1.0 <= first[0]["P1A"] <= 5.0
    # the worker wrote the same merged soups (the user's soup included)
    from safetensors.torch import load_file
    assert sorted(there["saved"]) == sorted(here["saved"]) and "psoups-P1A_0p750-P3A_0p250" in there["saved"]
    for name in here["saved"]:
        a = load_file(Path(here["saved"][name]) / "model.safetensors")
        b = load_file(Path(there["saved"][name]) / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_an_evaluation_actor_asks_for_a_gpu_when_the_cluster_has_one():
    auto = ev.EvalConfig()
    assert actor_options(auto, {"CPU": 2.0}) == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert actor_options(auto, {"CPU": 64.0, "GPU": 8.0}) == {"num_cpus": 2.0, "num_gpus": 1.0}
    assert actor_options(auto, {"CPU": 1.0}) == {"num_cpus": 1.0, "num_gpus": 0.0}  # capped: it can start
    assert actor_options(ev.EvalConfig(num_gpus=0), {"CPU": 8.0, "GPU": 8.0})["num_gpus"] == 0.0
    for bad, field in ((dict(num_gpus=-1), "num_gpus"), (dict(num_gpus="some"), "num_gpus"),
                       (dict(num_cpus=0), "num_cpus"), (dict(judge_dtype="fp8"), "judge_dtype")):
        with pytest.raises(ValueError, match=f"eval.{field}"):
            ev.EvalConfig(**bad).validate()


def test_the_7b_config_places_its_judge_and_evaluation_on_gpu_workers_in_bf16():
    from raypref.config import from_dict, load_yaml

    repo = Path(__file__).resolve().parents[1]
    cfg = from_dict(SoupsConfig, load_yaml(repo / "configs" / "soups-7b-8gpu.yaml"))
    cfg.validate()
    assert cfg.eval.judge_dtype == "bfloat16"
    node = {"CPU": 64.0, "GPU": 8.0, "memory": 512e9}  # its 8-GPU node
    options = actor_options(cfg.eval, node)
    assert options["num_gpus"] == 1.0 and options["num_cpus"] >= 4


def test_judge_checked_in_the_driver_without_loading_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.judge_model=.*no config.json"):
        ev.check_scorer(ev.EvalConfig(judge_model=str(tmp_path / "nothing")), World(seed=0), ["P1A"])
    assert ev.scoring_table(ev.EvalConfig(judge_model="x/y"), ["P1A"]) == \
        ev.JudgeScorer(None, {}).table(["P1A"])


def test_runs_start_as_the_cluster_grows(timed_runs, monkeypatch, tmp_path):
    """``runs_that_fit_now`` reads the cluster again before each launch: a cluster of 1 CPU
    runs one 1-CPU run; once it has 4 (an autoscaler added a node) the 4 waiting runs start
    together."""
    import ray

    import raypref.train.concurrent as concurrent
    from raypref.experiments.soups.training import runs_that_fit_now

    reads = []

    def growing_cluster():  # one CPU until the first run has ended, then four
        reads.append(1)
        return {"CPU": 4.0 if (tmp_path / "r0.end").exists() else 1.0}

    monkeypatch.setattr(ray, "cluster_resources", growing_cluster)
    jobs = {f"r{i}": (0.5, None) for i in range(5)}
    outcomes = concurrent.train_concurrently(jobs, tick_seconds=0.1,
                                             max_concurrent=runs_that_fit_now(Resources(cpus_per_worker=1.0)))
    submitted = timed_runs.submitted
    assert all(o.ok for o in outcomes.values()) and [n for n, _ in submitted] == list(jobs)
    ends = timed_runs.ends(jobs)
    assert submitted[1][1] > ends["r0"]  # alone while the cluster had one CPU
    later = [t for _, t in submitted[1:]]
    assert max(later) < min(ends[n] for n in list(jobs)[1:])  # then all four at once
    assert len(reads) >= 3


def test_the_weight_sweep_is_judged_on_its_own_prompts_and_samples_when_set(base_and_adapters, tmp_path):
    """eval.sweep_n_prompts / sweep_samples_per_prompt: the sweep (and the SFT answers it is read
    against) on its own design, the win rates' arms on theirs; unset, the sweep reuses SFT's
    answers of the win rates (nothing generated twice)."""
    base, adapters, _ = base_and_adapters
    world = World(seed=0)
    combos = [("P1A", "P3A")]

    def run(**design):
        cfg = SoupsConfig(output_dir=str(tmp_path), preferences=PREFS, combinations=[list(combos[0])],
                          baselines=["sft"], user_weights={}, user_target={},
                          eval=ev.EvalConfig(n_prompts=2, samples_per_prompt=1, max_new_tokens=4, batch_size=4,
                                             weight_grid=[0.0, 1.0], n_boot=10, arms=[], **design))
        cfg.validate()
        scorer = ev.make_scorer(cfg.eval, world, PREFS)
        prompts = ev.eval_prompts(cfg.eval, world)
        sweep_prompts = ev.eval_prompts(ev.sweep_design(cfg.eval), world)
        return cfg, scorer, sweep_prompts, evaluate_seed(cfg, 0, base, adapters, scorer, world, prompts, PREFS,
                                                         combos, False, sweep_prompts=sweep_prompts)

    cfg, scorer, sweep_prompts, own = run(sweep_n_prompts=3, sweep_samples_per_prompt=2)
    assert len(sweep_prompts) == 3 and len(own["sft"]) == 2  # the win rates' SFT: 2 prompts x 1
    for row in own["sweep"].values():
        assert len(row["sft_values"]) == 6 and all(len(v) == 6 for v in row["answer_values"])
    # the sweep's SFT answers are those a direct judging of the base on the sweep's design gives
    # (what scripts/soups_resweep.py does), and its quality is the one the sweep is read against
    from raypref.experiments.soups.seed_eval import seed_eval_config
    model, tokenizer = load_pretrained(base)
    _, direct = ev.judged_generations(scorer, model.eval(), tokenizer, sweep_prompts,
                                      ev.sweep_design(seed_eval_config(cfg, 0)))
    key = own["sweep"]["expertise"]["attribute"]
    assert own["sweep"]["expertise"]["sft_values"] == [s[key] for s in direct]
    assert own["sweep_sft_quality"] == pytest.approx(ev.mean_scores(direct)["quality"])
    # each answer's quality is kept beside its attribute value: the points' means come from them
    for row in own["sweep"].values():
        assert [np.mean(q) for q in row["answer_quality"]] == pytest.approx(row["quality"])
        assert np.mean(row["sft_quality_values"]) == pytest.approx(own["sweep_sft_quality"])

    _, _, same_prompts, plain = run()
    assert len(same_prompts) == 2
    for row in plain["sweep"].values():
        assert len(row["sft_values"]) == 2 and all(len(v) == 2 for v in row["answer_values"])
    assert plain["sweep_sft_quality"] == pytest.approx(ev.mean_scores(plain["sft"])["quality"])
    with pytest.raises(ValueError, match="eval.sweep_samples_per_prompt"):
        ev.EvalConfig(sweep_samples_per_prompt=-1).validate()
