"""Policy-optimization specs through the Ray Train + DeepSpeed runner (PPO, P-DPO)."""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import pytest
import torch

from raypref.models.factory import LoraSettings
from raypref.recipes.ppo import PPOSpec
from raypref.rewards.world import WeightedJudgeReward
from raypref.train.runner import read_spec_state


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """An untrained one-layer GPT-2 over the world's vocabulary, saved as a base folder."""
    from raypref.data.world import World
    from raypref.models.factory import (ModelConfig, build_policy, build_tokenizer,
                                        save_pretrained_safetensors)

    tokenizer = build_tokenizer(ModelConfig(), World(seed=0).vocabulary())
    torch.manual_seed(0)
    model = build_policy(ModelConfig(n_layer=1, n_embd=32, n_head=2), tokenizer)
    return str(save_pretrained_safetensors(model, tokenizer, tmp_path_factory.mktemp("base") / "base"))


def test_ppo_is_a_per_preference_recipe_for_soups(tiny_base):
    """`--algo ppo` passes the soups config's check; each preference's spec takes its reward from
    the preference's world judge and its prompts from the pairs; P-MORL has no single judge."""
    from raypref.data.records import PreferenceRecord
    from raypref.experiments.soups.config import SoupsConfig
    from raypref.recipes import recipe
    from raypref.recipes.dpo import DPOConfig
    from raypref.recipes.ppo import PPOSpec

    SoupsConfig(algo="ppo").validate()
    training = DPOConfig(steps=7, micro_batch_size=4, max_length=96)
    pairs = [PreferenceRecord(p, "a b", "c", 2) for p in ("q one", "q two", "q one")]
    spec = recipe("ppo").per_preference(training, tiny_base, "P2A", pairs, 0)
    assert isinstance(spec, PPOSpec) and spec.name == "P2A"
    assert spec.prompts == ["q one", "q two"] and spec.max_length == 96 and spec.lora == training.lora
    reward = spec.build_model("reward")
    assert reward.weights == {"verbosity": -1.0}  # P2A: concise
    with pytest.raises(ValueError, match="P-MORL: 3 pairs name no combination"):
        recipe("ppo").per_preference(training, tiny_base, "P-MORL", pairs, 0)  # P-MORL pairs carry it
    with pytest.raises(ValueError, match="training.rollout_size"):
        recipe("ppo").per_preference(DPOConfig(micro_batch_size=32), tiny_base, "P2A", pairs, 0)


def test_soups_ppo_section_trains_each_policy_when_algo_is_ppo():
    """`--algo ppo` trains with the soups config's `ppo` section (a PPOConfig), the DPO `training`
    section otherwise; the runs' key follows the section in use; bad PPO fields name `ppo.`."""
    from raypref.config import parse_args
    from raypref.experiments.soups.config import SoupsConfig
    from raypref.experiments.soups.training import training_key
    from raypref.recipes.dpo import DPOConfig
    from raypref.recipes.ppo import PPOConfig

    cfg = parse_args(SoupsConfig, ["--algo", "ppo", "--ppo.kl_coef", "0.2", "--ppo.steps", "12"])
    assert isinstance(cfg.policy_training, PPOConfig) and cfg.policy_training.kl_coef == 0.2
    assert isinstance(SoupsConfig().policy_training, DPOConfig)
    assert training_key(cfg) != training_key(parse_args(SoupsConfig, ["--algo", "ppo", "--ppo.steps", "12"]))
    # a PPO field does not move the DPO runs
    assert training_key(SoupsConfig()) == training_key(parse_args(SoupsConfig, ["--ppo.kl_coef", "0.2"]))
    with pytest.raises(ValueError, match="ppo.rollout_size"):
        parse_args(SoupsConfig, ["--algo", "ppo", "--ppo.micro_batch_size", "32"])
    parse_args(SoupsConfig, ["--ppo.micro_batch_size", "32"])  # not in use with algo=dpo: not checked


def test_ppo_pmorl_reward_follows_each_prompts_combination(tiny_base):
    """P-MORL under PPO: each pair's prompt names a combination (user_text) and is rewarded by that
    combination's mean preference, so the same friendly response scores high for P3A, low for P3B."""
    import numpy as np

    from raypref.data.records import PreferenceRecord
    from raypref.data.world import World
    from raypref.recipes import recipe
    from raypref.recipes.ppo import PMORL, PPOConfig, combination_weights

    assert combination_weights(["P1A", "P2B", "P3A"]) == pytest.approx(
        {"expertise": -1 / 3, "verbosity": 1 / 3, "style": 1 / 6})
    world = World(seed=0)
    friendly = next(r for r in world.sft_corpus(200, np.random.default_rng(0))
                    if world.judge(r[1])["style"] > 0.4)[1]
    pairs = [PreferenceRecord("q a", "x", "y", user_text="P1A+P2A+P3A"),
             PreferenceRecord("q b", "x", "y", user_text="P1A+P2A+P3B")]
    spec = recipe("ppo").per_preference(PPOConfig(), tiny_base, PMORL, pairs, 0)
    reward = spec.build_model("reward")
    high, low = reward.score(["q a", "q b"], [friendly, friendly]).tolist()
    assert high - low == pytest.approx(2 * world.judge(friendly)["style"] / 6)
    with pytest.raises(ValueError, match="no weights for prompt 'q c'"):
        reward.score(["q c"], [friendly])
    assert "per-prompt weights (2 prompts)" in spec.policy_info()["reward"]


def test_ppo_export_is_a_soups_policy(tiny_base, tmp_path):
    """The actor's adapter at the top (where soups load and merge it), the critic beside it."""
    from peft import PeftModel

    from raypref.models.factory import load_pretrained
    from raypref.recipes.ppo import PPOSpec
    from raypref.rewards.world import WeightedJudgeReward

    spec = PPOSpec(tiny_base, ["q"], functools.partial(WeightedJudgeReward, {"style": 1.0}), name="P3A")
    torch.manual_seed(0)
    models = {role: spec.build_model(role) for role in ("actor", "critic")}
    with torch.no_grad():
        for name, p in models["actor"].named_parameters():
            if "lora_B" in name:
                p.normal_()
    spec.export(models, tmp_path)
    info = json.loads((tmp_path / "soup_policy.json").read_text())
    assert info["preference"] == "P3A" and info["sft_dir"] == tiny_base and "style" in info["reward"]
    assert (tmp_path / "critic" / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(load_pretrained(tiny_base)[0], str(tmp_path))
    ids = torch.tensor([[1, 2, 3]])
    models["actor"].eval()
    assert torch.allclose(reloaded(input_ids=ids).logits, models["actor"](input_ids=ids).logits)


def test_job_configs_name_bad_fields():
    from raypref.experiments.pdpo import PDPOJobConfig
    from raypref.experiments.ppo import PPOJobConfig

    with pytest.raises(ValueError, match="user_model"):
        PDPOJobConfig(user_model="both").validate()
    with pytest.raises(ValueError, match="PDPOJobConfig.loss"):
        PDPOJobConfig(loss="kto").validate()
    with pytest.raises(ValueError, match="P9Z"):
        PPOJobConfig(preference="P9Z").validate()


@pytest.fixture(scope="module")
def warm_base(tmp_path_factory):
    """The tiny policy warm-started on the world's corpus for 150 steps (in-process, seconds): PPO
    needs a base that already writes the world's openers and closers to move their mix (on an
    untrained base the style reward did not rise)."""
    import numpy as np

    from raypref.algos.sft import sft_loss
    from raypref.data.world import World
    from raypref.models.factory import (ModelConfig, build_policy, build_tokenizer, encode_example,
                                        save_pretrained_safetensors)
    from raypref.recipes.sft import collate

    world = World(seed=0)
    tokenizer = build_tokenizer(ModelConfig(), world.vocabulary())
    torch.manual_seed(0)
    model = build_policy(ModelConfig(n_layer=1, n_embd=64, n_head=2), tokenizer)
    examples = [encode_example(tokenizer, p, r, 128) for p, r in world.sft_corpus(1000, np.random.default_rng(0))]
    optimizer, rng = torch.optim.AdamW(model.parameters(), lr=3e-3), np.random.default_rng(0)
    for _ in range(150):
        batch = collate([examples[i] for i in rng.integers(len(examples), size=16)], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = sft_loss(logits, batch["input_ids"], batch["response_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return str(save_pretrained_safetensors(model, tokenizer, tmp_path_factory.mktemp("warm") / "base"))


@pytest.mark.slow
def test_ppo_through_runner_raises_the_world_judge_reward(ray_local, warm_base, tmp_path):
    """P3A (friendly style) judged by the world, through Ray Train + DeepSpeed: four roles (actor
    and critic as engines, reference and reward frozen); the mean reward of the last two rollouts
    beats the first two's by a clear margin (measured: about -0.1 -> +0.3 in process), KL to the
    reference is 0 on the first rollout (the LoRA starts as the reference) and grows as the actor
    moves; the soups-style export."""
    from raypref.data.world import World
    from raypref.recipes.ppo import PPOSpec
    from raypref.rewards.world import WeightedJudgeReward
    from raypref.train.runner import RunnerConfig, run

    spec = PPOSpec(warm_base, World(seed=0).prompts(64), functools.partial(WeightedJudgeReward, {"style": 1.0}),
                   rollout_size=16, ppo_epochs=2, max_new_tokens=32)
    cfg = RunnerConfig(num_workers=1, zero_stage=0, lr=3e-3, warmup_steps=2, schedule="warmup_constant",
                       max_steps=32, micro_batch_size=8, checkpoint_every=32, log_every=8,
                       storage_path=str(tmp_path), name="ppo")
    result = run(spec, cfg)
    rows = result.metrics
    assert len(rows) == 32 and {"reward/score", "kl/per_response", "kl/coef", "loss.actor", "loss.critic"} <= set(rows[0])
    # a rollout feeds 4 steps (2 epochs x 16 / 8): the first and last 8 steps are two rollouts each
    first = sum(r["reward/score"] for r in rows[:8]) / 8
    last = sum(r["reward/score"] for r in rows[-8:]) / 8
    assert last > first + 0.15, (first, last)
    assert abs(rows[0]["kl/per_response"]) < 1e-5 and rows[0]["policy/approx_kl"] < 1e-8
    assert rows[-1]["kl/per_response"] > 0.5  # per response, summed over its tokens
    # the actor's adapter at the top (soups merge it like a DPO policy's), the critic beside it
    assert (result.export_path / "adapter_model.safetensors").exists()
    assert (result.export_path / "critic" / "model.safetensors").exists()
    assert json.loads((result.export_path / "soup_policy.json").read_text())["algo"] == "ppo"


@pytest.mark.slow
def test_pdpo_job_through_runner_reports_accuracies_and_reloads(ray_local, tiny_base, tmp_path):
    """The P-DPO job with a cluster user model and the IPO loss for a few steps: the accuracies
    come from the spec's evaluation through the runner, and the exported adapter + user model
    reload into a model that reproduces that evaluation."""
    from peft import PeftModel

    from raypref.config import parse_args
    from raypref.data.world import World
    from raypref.experiments.pdpo import PDPOJobConfig, length_conflict_data, train_pdpo
    from raypref.models.factory import load_pretrained
    from raypref.models.user_model import PersonalizedLM, UserModel
    from raypref.recipes.pdpo import PDPOSpec

    argv = ["--base_policy", tiny_base, "--output_dir", str(tmp_path), "--user_model", "cluster",
            "--n_clusters", "2", "--n_tokens", "2", "--loss", "ipo", "--n_annotators", "4",
            "--unseen_annotators", "1", "--pairs_per_user", "8", "--eval_pairs_per_user", "3",
            "--training.steps", "4", "--training.micro_batch_size", "4", "--training.warmup_steps", "1",
            "--resources.checkpoint_every", "4", "--resources.eval_every", "2", "--max_length", "96"]
    result = train_pdpo(parse_args(PDPOJobConfig, argv))  # what jobs/pdpo.py runs
    s = result.summary
    assert s["steps"] == 4 and s["loss"] == "ipo"
    assert set(s["per_user"]) == {1, 2, 3, 4} and all(0.0 <= a <= 1.0 for a in s["per_user"].values())
    assert s["accuracy_top"] is not None and s["accuracy_generic"] is not None  # user 5 is unseen
    assert s["accuracy_minority"] is not None and s["accuracy_majority"] is not None

    users = UserModel.load(result.policy_dir)
    assert users.users == [1, 2, 3, 4]
    base, _ = load_pretrained(tiny_base)
    reloaded = PersonalizedLM(PeftModel.from_pretrained(base, str(result.policy_dir)), users)
    cfg = parse_args(PDPOJobConfig, argv)
    train, held_out, groups = length_conflict_data(cfg, World(seed=cfg.sft.world_seed))
    spec = PDPOSpec(tiny_base, train, held_out, user_model=cfg.user_model_config(), groups=groups,
                    max_length=96, loss_type="ipo")
    report = spec.evaluate_pairs(reloaded, held_out)
    assert report["acc/top"] == pytest.approx(s["accuracy_top"])
    assert report["acc/generic"] == pytest.approx(s["accuracy_generic"])


@pytest.mark.slow
def test_rsf_job_smoke_two_iterations_and_direction_sweep(ray_local, tiny_base, tmp_path):
    """jobs/rsf.py's library entry on a tiny base for two short iterations: the base gains the
    direction prompt's tokens, training runs through the runner, and the sweep reports length and
    both objectives per direction for the base and the trained policy."""
    from raypref.config import parse_args
    from raypref.experiments.rsf import RSFJobConfig, train_rsf
    from raypref.models.factory import load_pretrained
    from raypref.recipes.rsf import spelled_direction

    argv = ["--base_policy", tiny_base, "--output_dir", str(tmp_path), "--n_samples", "2",
            "--directions_per_prompt", "1", "--prompts_per_iteration", "2", "--steps_per_iteration", "2",
            "--training.steps", "4", "--training.micro_batch_size", "2", "--training.warmup_steps", "1",
            "--resources.checkpoint_every", "4", "--max_new_tokens", "6", "--n_prompts", "8",
            "--n_original", "20", "--eval_directions", "2", "--eval_prompts", "2",
            "--objectives", '["overall_helpfulness", "expertise"]']  # 6 new tokens are too few for verbosity
    s = train_rsf(parse_args(RSFJobConfig, argv)).summary  # what jobs/rsf.py runs
    assert s["steps"] == 4 and s["iterations"] == 2
    assert sorted(s["selection"]) == ["1", "2"] and all(kept["kept_words"] > 0 for kept in s["selection"].values())
    for label in ("base", "policy"):
        rows = s["sweep"][label]
        assert [r["direction"] for r in rows] == [[1.0, 0.0], [0.7071, -0.7071]]
        assert all({"length", "overall_helpfulness", "expertise", "v_dot_r"} <= set(r) for r in rows)
    _, tokenizer = load_pretrained(s["policy_dir"])
    ids = tokenizer(spelled_direction([0.8, -0.6], ["overall_helpfulness", "expertise"]))["input_ids"]
    assert tokenizer.unk_token_id not in ids  # the policy's tokenizer reads the direction
    # the last checkpoint holds iteration 2's dataset (what scripts/dpa_learnability.py reads)
    from raypref.train.runner import read_spec_state
    held = read_spec_state(Path(s["policy_dir"]).parent / "checkpoint_000004")
    assert held["iteration"] == 2 and len(held["examples"]) >= 2
    assert all(q.startswith(spelled_direction([1.0, 0.0], ["overall_helpfulness", "expertise"])[:20])
               for q, *_ in held["examples"] if "expertise *" in q)


@dataclasses.dataclass
class LoggedPPOSpec(PPOSpec):
    """PPOSpec that also writes, per worker attempt, the step it starts at (``starts.txt``) and
    each rollout it generates as ``<rollout index> <step>`` (``rollouts.txt``); training is PPOSpec's."""

    log_dir: str = ""

    def batches(self, ctx):
        with open(Path(self.log_dir) / "starts.txt", "a") as f:
            f.write(f"{ctx.step}\n")
        return super().batches(ctx)

    def make_rollout(self, ctx):
        with open(Path(self.log_dir) / "rollouts.txt", "a") as f:
            f.write(f"{self.rollouts} {ctx.step}\n")
        return super().make_rollout(ctx)


@pytest.mark.slow
def test_ppo_worker_crash_inside_a_rollout_resumes_exactly(ray_local, tiny_base, tmp_path):
    """PPO through Ray Train + DeepSpeed, once uninterrupted and once with the worker killed
    (os._exit) at step 11. A rollout feeds 6 steps (2 epochs x 6 / 2): rollout 1 feeds steps 7-12,
    generated at step 7. Ray Train commits a report when its controller polls the worker (every
    2 s; a worker's queue holds one report), so the checkpoint of step 10 may be lost with the
    worker and the run resumes after step 10 or step 8: both inside rollout 1, whose rest the
    restarted worker must read from the saved buffer; rollout 2 (step 13) then needs the saved KL
    controller and reward moments. The two runs must agree bit for bit (metrics, spec state,
    actor and critic weights): a worker is one CPU process with a fixed thread count, generation
    is seeded per rollout and LoRA dropout draws from the torch RNG the checkpoint restores, so
    nothing in the computation may differ."""
    from ray import cloudpickle
    from safetensors.torch import load_file

    from raypref.data.world import World
    from raypref.train.faults import FaultInjectingSpec
    from raypref.train.runner import RunnerConfig, run

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/

    def spec(log_dir: Path) -> LoggedPPOSpec:
        log_dir.mkdir()
        # expertise and style vary over an untrained base's random words; kl_horizon=20 moves the
        # adaptive coefficient by 6% per rollout, so a lost KL controller would show
        return LoggedPPOSpec(tiny_base, World(seed=0).prompts(16),
                             functools.partial(WeightedJudgeReward, {"expertise": 1.0, "style": 1.0}),
                             lora=LoraSettings(r=4, alpha=8, dropout=0.1), rollout_size=6, ppo_epochs=2,
                             max_new_tokens=8, max_length=64, kl_target=1.0, kl_horizon=20,
                             log_dir=str(log_dir))

    def config(name: str) -> RunnerConfig:
        # 6 steps per rollout: rollouts start at steps 1, 7 and 13; checkpoints every 2 steps
        return RunnerConfig(num_workers=1, zero_stage=0, lr=3e-3, warmup_steps=2, max_steps=14,
                            micro_batch_size=2, checkpoint_every=2, max_failures=1, log_every=14,
                            storage_path=str(tmp_path / "runs"), name=name, seed=1)

    ref_log, crash_log, marker = tmp_path / "ref", tmp_path / "crash", tmp_path / "crashed"
    reference = run(spec(ref_log), config("reference"))
    crashed = run(FaultInjectingSpec(spec(crash_log), mode="once", marker=str(marker), at_step=11),
                  config("crashed"))

    # the worker died once at step 11; the second attempt resumed inside rollout 1 (see above)
    assert marker.exists()
    assert (ref_log / "starts.txt").read_text().split() == ["1"]
    starts = (crash_log / "starts.txt").read_text().split()
    assert starts[0] == "1" and starts[1:] in (["11"], ["9"]), starts  # two attempts
    # ... without generating rollout 1 again: it read the rest of it from the checkpoint
    rollouts = (ref_log / "rollouts.txt").read_text().splitlines()
    assert rollouts == ["0 1", "1 7", "2 13"]
    assert (crash_log / "rollouts.txt").read_text().splitlines() == rollouts

    assert crashed.final_step == reference.final_step == 14
    assert [m["step"] for m in crashed.metrics] == list(range(1, 15))  # each step once
    rows = reference.metrics
    assert {"reward/score", "kl/per_response", "kl/coef", "loss.actor", "loss.critic"} <= set(rows[0])
    coefs = [rows[i]["kl/coef"] for i in (0, 6, 12)]  # one per rollout
    assert len(set(coefs)) == 3 and rows[12]["kl/per_response"] != 0, coefs  # the state had moved
    assert len({rows[i]["reward/score"] for i in (0, 6, 12)}) == 3
    for got, want in zip(crashed.metrics, rows):
        assert got == want, got["step"]  # every metric, exactly

    def spec_state(result) -> dict:
        return read_spec_state(result.checkpoint_path)

    got, want = spec_state(crashed), spec_state(reference)
    assert (got["position"], got["rollouts"]) == (want["position"], want["rollouts"]) == (2, 3)  # 2 steps into rollout 2
    assert got["kl_ctl"] == want["kl_ctl"] and got["moments"] == want["moments"]
    assert got["buffer"].keys() == want["buffer"].keys()
    for key in want["buffer"]:
        assert torch.equal(got["buffer"][key], want["buffer"][key]), key

    for file in ("adapter_model.safetensors", "critic/model.safetensors"):
        final, expected = load_file(crashed.export_path / file), load_file(reference.export_path / file)
        assert final.keys() == expected.keys() and final, file
        for key in expected:
            assert torch.equal(final[key], expected[key]), (file, key)
    trained = load_file(reference.export_path / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # the actor moved


def test_generation_budgets_too_short_for_the_verbosity_judge_are_refused():
    """Below ~100 new tokens every sample reads verbosity 0 (PPO on P2A/P2B and RSF learned nothing
    that way, twice): the jobs refuse such a budget before any work, naming the field."""
    from raypref.data.world import World
    from raypref.experiments.world import check_length_reach

    world = World(seed=0)
    zero, one = world.verbosity_words()
    with pytest.raises(ValueError, match=r"RSFJobConfig\.max_new_tokens=64: too few for the verbosity judge"):
        check_length_reach(world, ["helpfulness", "verbosity"], 64, "RSFJobConfig")
    check_length_reach(world, ["helpfulness", "verbosity"], int(one) + 1, "RSFJobConfig")
    check_length_reach(world, ["helpfulness", "expertise"], 6, "RSFJobConfig")  # length does not matter
    assert 40 < zero < one < 128  # the defaults of jobs/ppo.py and jobs/rsf.py reach the judge's range
