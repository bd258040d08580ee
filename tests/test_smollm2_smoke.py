"""Every job end to end on the real offline model (configs/*-smollm2-smoke.yaml): SmolLM2-135M-
Instruct with its chat template and LoRA on q/k/v/o, at a smoke budget (a few pairs and steps,
short lengths). Each test reads the job's own config file, as ``jobs/<job>.py --config`` does,
and moves only its output (and data) folders to the test's temp folder. The data is the
simulated world's word-level text, except the soups job's (a tiny pool of SmolLM2's own answers
judged by the text judges): the point is the real model's path (templating, LoRA targets,
generation, judging, serving)."""
from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from safetensors.torch import load_file

from raypref.config import parse_args

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODEL = "smollm2-135m-instruct"


def config(cls, job: str, *flags: str):
    """The job's smoke config file, parsed as its job parses it, plus ``flags``."""
    path = CONFIGS / f"{job}-smollm2-smoke.yaml"
    return parse_args(cls, ["--config", str(path), *flags])


def trained_lora(folder: Path) -> dict:
    """The LoRA tensors exported under ``folder``; B starts at zero, so a trained one moved."""
    files = sorted(Path(folder).rglob("adapter_model.safetensors"))
    assert files, f"no adapter_model.safetensors under {folder}"
    weights = load_file(files[0])
    lora_b = {k: t for k, t in weights.items() if "lora_B" in k}
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b.values()), "the adapter never moved"
    # LoRA sits on the Llama attention projections the config names
    assert {k.split(".lora_B")[0].rsplit(".", 1)[-1] for k in lora_b} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    return weights


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Train and test shards of preference P1A in the world (what jobs/simulate.py writes)."""
    from raypref.data.world import World

    root = tmp_path_factory.mktemp("shards")
    world = World(seed=0)
    for name, seed, n in (("train", 3, 8), ("test", 4, 4)):
        folder = root / name
        folder.mkdir()
        rows = [r.to_row() for r in world.pairs_for_preference("P1A", n, np.random.default_rng(seed))]
        (folder / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_dpo(ray_local, tmp_path, shards):
    from raypref.experiments.preference import DPOJobConfig, train_dpo

    cfg = config(DPOJobConfig, "dpo", "--output_dir", str(tmp_path), "--train_data", str(shards / "train"),
                 "--test_data", str(shards / "test"), "--shard_formats", "jsonl", "--user_ids", "[]")
    assert cfg.base_policy == MODEL
    result = train_dpo(cfg)
    trained_lora(result.adapter_dir)
    assert result.summary["steps"] == 3 and finite(result.summary["eval"]["reward_accuracy"])


def test_pdpo(ray_local, tmp_path):
    from raypref.experiments.pdpo import PDPOJobConfig, train_pdpo

    result = train_pdpo(config(PDPOJobConfig, "pdpo", "--output_dir", str(tmp_path)))
    trained_lora(result.policy_dir)
    assert finite(result.summary["accuracy_top"]) and finite(result.summary["accuracy_generic"])


def test_ppo(ray_local, tmp_path):
    from raypref.experiments.ppo import PPOJobConfig, train_ppo

    result = train_ppo(config(PPOJobConfig, "ppo", "--output_dir", str(tmp_path)))
    trained_lora(result.policy_dir)
    s = result.summary
    assert finite(s["heldout_reward_base"]) and finite(s["heldout_reward_policy"]) and finite(s["kl_per_response_last"])


def test_reward(ray_local, tmp_path):
    from raypref.experiments.reward import RewardJobConfig, train_reward

    cfg = config(RewardJobConfig, "reward", "--output_dir", str(tmp_path))
    assert cfg.encoder.name_or_path == MODEL
    result = train_reward(cfg)
    final = result.summary["final"]  # the last evaluation: accuracy per user and pooled
    accuracies = {k: v for k, v in final.items() if "acc" in k}
    assert accuracies and all(finite(v) for v in accuracies.values()), final


def test_sweep(ray_local, tmp_path, shards):
    from raypref.experiments.sweep import run_sweep
    from raypref.sweep.run import SweepConfig

    data = json.dumps({"train_data": str(shards / "train"), "test_data": str(shards / "test"),
                       "shard_formats": ["jsonl"], "user_ids": []})
    cfg = config(SweepConfig, "sweep", "--output_dir", str(tmp_path))
    cfg.job_config.update(json.loads(data))
    summary = run_sweep(cfg)
    assert summary["trials"] == 1 and not summary["failed"], summary
    assert summary["metric"] == "eval.heldout_reward_accuracy" and finite(summary["best"]["metric"])
    trained_lora(Path(summary["best"]["model_path"]))


@pytest.fixture(scope="module")
def soups_run(ray_local, tmp_path_factory):
    from raypref.experiments.soups.config import SoupsConfig
    from raypref.experiments.soups.run import run_soups

    out = tmp_path_factory.mktemp("soups-smollm2")
    started = time.time()
    result = run_soups(config(SoupsConfig, "soups", "--output_dir", str(out), "--pool.dir", str(out / "pools")))
    return result, time.time() - started


def test_soups(soups_run):
    result, _ = soups_run
    assert not result.failed, result.failed
    for policy in ("P3A", "P3B", "P-MORL"):
        final = next((result.output_dir / "runs").glob(f"*/{policy}-s0/final"))
        trained_lora(final)
        # P-MORL read its combination's instruction as the chat template's system message
        info = json.loads((final / "soup_policy.json").read_text())
        assert info.get("system") == ("combination" if policy == "P-MORL" else None), info
    assert {"P-Soups", "P-MORL"} <= set(result.quality) and all(finite(q) for q in result.quality.values())
    # pairs of real text from the pool, judged by the text judges: the report says so, and the
    # sweep reads friendliness (VADER) for the style dimension
    report = result.report_path.read_text()
    assert "text judges" in report and "candidate pool" in report, report[:600]
    assert result.sweep["style"]["attribute"] == "friendliness"
    # the pool's own answers are the reference for quality at a matched attribute level
    assert len(result.sweep["style"]["quality_matched"]) == 2, result.sweep["style"]
    assert "quality at matched attribute" in report and "rises in" in report
    assert len(result.sweep["style"]["intervals"]) == 2 and 0.0 <= result.sweep["style"]["p_rises"] <= 1.0
    assert len(list((result.output_dir / "pools").glob("pool-*/pool.jsonl"))) == 1


def test_resweep_reproduces_the_jobs_sweep(soups_run):
    """scripts/soups_resweep.py judges a finished run's sweeps again with the job's own functions
    and seeds: on the job's settings it gives the job's numbers (so a larger judging of the same
    policies differs from the job's only by what it was asked to change)."""
    import importlib.util

    import torch

    from raypref.experiments.soups.config import SoupsConfig

    path = Path(__file__).resolve().parents[1] / "scripts" / "soups_resweep.py"
    spec = importlib.util.spec_from_file_location("soups_resweep", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result, _ = soups_run
    out = result.output_dir
    cfg = config(SoupsConfig, "soups", "--output_dir", str(out), "--pool.dir", str(out / "pools"))
    threads = torch.get_num_threads()
    try:
        again = script.resweep(out, cfg, threads=2)  # the evaluation actor's threads in the suite's Ray
    finally:
        torch.set_num_threads(threads)
    job, redone = result.sweep["style"], again["sweep"]["style"]
    assert redone["weights"] == job["weights"] == [0.0, 1.0]
    assert redone["scores"] == pytest.approx(job["scores"], abs=1e-9), (redone, job)
    assert redone["quality"] == pytest.approx(job["quality"], abs=1e-9)
    assert again["prompts"] == 2 and again["samples_per_prompt"] == 1
    with pytest.raises(ValueError, match="0 sets of finished seed-0 policies"):
        script.resweep(out / "pools", cfg)


def test_dpa_direction_probe_reads_the_system_message(soups_run):
    """scripts/dpa_direction_probe.py on the soups smoke run's pool: the direction's system text
    reaches the model (two directions give different log-probabilities), a model probed as both
    base and policy gives the same numbers, and the first direction's shift is zero by definition."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "dpa_direction_probe.py"
    spec = importlib.util.spec_from_file_location("dpa_direction_probe", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result, _ = soups_run
    out = script.main([MODEL, "--base", MODEL, "--config", str(CONFIGS / "soups-smollm2-smoke.yaml"),
                       "--pool_dir", str(result.output_dir / "pools"), "--directions", "2"])
    base, policy = out["base"], out["policy"]
    assert base == policy
    assert base["directions"] == [[1.0, 0.0], [0.7071, -0.7071]]
    assert all(finite(d) for d in base["delta"]) and base["delta"][0] != base["delta"][1]
    assert base["shift"][0]["mean"] == 0.0 and finite(base["shift"][1]["mean"])
    assert set(base["worded_delta"]) == {"informative", "concise"}
    assert base["worded_delta"]["informative"] != base["worded_delta"]["concise"]


def test_dpa_learnability_text_path(soups_run, tmp_path):
    """scripts/dpa_learnability.py on the soups smoke run's pool, a few steps: it trains SmolLM2 on
    the best answer per direction (the full model moves: the probe reads differently after), and
    writes the base's and the step's probe and sweep to --out."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "dpa_learnability.py"
    spec = importlib.util.spec_from_file_location("dpa_learnability", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result, _ = soups_run
    out_file = tmp_path / "readings.json"
    out = script.main([MODEL, "--pool_config", str(CONFIGS / "soups-smollm2-smoke.yaml"),
                       "--pool_dir", str(result.output_dir / "pools"), "--steps", "2", "--batch", "2",
                       "--lr", "1e-4", "--directions_per_prompt", "2", "--sweep_prompts", "1",
                       "--sweep_samples", "2", "--max_new_tokens", "6", "--out", str(out_file)])
    assert out["examples"] == 2 * 4 and json.loads(out_file.read_text()) == json.loads(json.dumps(out))
    assert len(out["ideal_words"]) == 4 and all(w > 0 for w in out["ideal_words"])
    (reading,) = out["readings"]
    assert reading["step"] == 2 and finite(reading["loss"])
    assert reading["probe"]["delta"] != out["base"]["probe"]["delta"]   # the model was trained
    for sweep in (out["base"]["sweep"], reading["sweep"]):
        assert len(sweep["rows"]) == 4 and all(finite(r["length"]) and finite(r["length_sd"]) for r in sweep["rows"])
        assert isinstance(sweep["length_monotone_decreasing"], bool)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve(soups_run):
    """The serve config's app over the soups smoke run: a chat completion through SmolLM2's
    chat template, greedy, equal to the same soup's /v1/generate."""
    from ray import serve

    from raypref.experiments.serve import load_serve_config
    from raypref.models.chat import prompt_text
    from raypref.models.factory import load_tokenizer
    from raypref.serve.app import serve_soups

    result, _ = soups_run
    _, args, deployment = load_serve_config(str(CONFIGS / "serve-smollm2-smoke.yaml"))
    args = {**args, "output_dir": str(result.output_dir), "max_new_tokens": 6}
    deployment = {**deployment, "ray_actor_options": {"num_cpus": 0}}  # the suite's Ray has 2 CPUs
    url = serve_soups(args, port=_free_port(), deployment=deployment)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        weights = {"P3A": 0.5, "P3B": 0.5}
        models = requests.get(f"{url}/v1/models", timeout=60).json()["data"]
        assert len(models) == 1, models  # the soups run's training key
        chat = requests.post(f"{url}/v1/chat/completions", timeout=180, json={
            "model": models[0]["id"], "messages": [{"role": "user", "content": "Name a planet."}], "max_tokens": 6,
            "temperature": 0, "preferences": weights})
        assert chat.status_code == 200, chat.text
        body = chat.json()
        assert body["choices"][0]["message"]["content"].strip(), body
        # the prompt went through SmolLM2's chat template (its default system message included)
        tok = load_tokenizer(MODEL)
        assert body["usage"]["prompt_tokens"] == len(tok(prompt_text(tok, "Name a planet."),
                                                         add_special_tokens=False)["input_ids"])
        generated = requests.post(f"{url}/v1/generate", timeout=180, json={
            "prompt": "Name a planet.", "preferences": weights, "max_new_tokens": 6})
        assert generated.status_code == 200, generated.text
        assert body["raypref"]["token_ids"] == generated.json()["token_ids"]  # the same greedy soup
        assert body["choices"][0]["message"]["content"] == generated.json()["text"]
    finally:
        serve.shutdown()
