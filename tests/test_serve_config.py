"""Static checks of the Serve config files (nothing is started)."""
from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    ServeDeploySchema.model_validate(cfg)  # Serve's own schema for `serve run` / `serve deploy`
    return cfg


def test_soups_serve_config_is_valid_and_binds_loopback():
    from raypref.serve.app import ServerArgs, SoupsServer

    cfg = _load("serve.yaml")
    assert cfg["http_options"]["host"] == "127.0.0.1"
    (app,) = cfg["applications"]
    module, name = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), name))
    ServerArgs.model_validate(app["args"])  # every arg is one the builder takes
    assert {d["name"] for d in app["deployments"]} == {SoupsServer.name}


def test_jobs_serve_reads_the_config():
    from raypref.experiments.serve import load_serve_config

    http, args, deployment = load_serve_config(str(ROOT / "configs" / "serve.yaml"))
    assert http["host"] == "127.0.0.1" and args["output_dir"] and "autoscaling_config" in deployment


def test_serve_flags_are_spelled_like_every_jobs_and_the_old_spelling_still_works():
    from raypref.experiments.serve import parser

    assert parser().parse_args(["--output_dir", "a", "--mlflow_run", "r"]).output_dir == "a"
    old = parser().parse_args(["--output-dir", "b", "--num-replicas", "2"])
    assert (old.output_dir, old.num_replicas) == ("b", 2)


def test_optional_vllm_config_is_a_valid_serve_llm_app():
    """Static only: Ray Serve LLM (vLLM) is not installed on CPU machines."""
    cfg = _load("serve-vllm-gpu.yaml")
    assert cfg["http_options"]["host"] == "127.0.0.1"
    (app,) = cfg["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    (llm,) = app["args"]["llm_configs"]
    # fields of ray.serve.llm.LLMConfig (docs: Serve LLM configuration reference)
    assert set(llm) <= {"model_loading_config", "engine_kwargs", "accelerator_type", "deployment_config",
                        "runtime_env", "lora_config", "placement_group_config", "accelerator_config"}
    assert set(llm["model_loading_config"]) <= {"model_id", "model_source", "tokenizer_source"}
    assert llm["model_loading_config"]["model_id"].startswith("psoups-")  # a soups job soup name
    assert llm["deployment_config"]["autoscaling_config"]["min_replicas"] >= 1
