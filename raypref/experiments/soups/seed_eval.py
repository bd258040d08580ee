"""One training seed's evaluation in the soups job, and the Ray actor that runs it on a worker.

Merging soups, judged generation of every arm, the weight sweeps, held-out implicit-reward
accuracy and writing seed 0's merged soups happen in a ``SeedEvaluator`` actor, one per seed,
that asks for a GPU when the cluster has one (``eval.num_gpus``) and loads the LM judge once
(in ``eval.judge_dtype``). The driver only gathers plain numbers and texts
(``evaluate_on_workers``). The functions the actor calls are plain in-process functions
(``evaluate_seed``, ``heldout_accuracy``): same seeds, same generations and scores either way.

Merges run on the worker's CPU (the exact merge writes into CPU tensors); a merged model moves
to the worker's GPU, if it has one, only to generate.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import ray
import torch

from raypref import atomic
from raypref.experiments.soups import evaluate as ev
from raypref.experiments.soups.compare import SOUPS
from raypref.experiments.soups.training import PMORL
from raypref.models.factory import load_pretrained, save_pretrained_safetensors
from raypref.models.merge import LoraAdapter, soup_model
from raypref.recipes.dpo import evaluate_pairs


def _log(msg: str) -> None:
    print(f"[soups {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def soup_name(weights: dict[str, float]) -> str:
    """A name that states the weights, e.g. psoups-P1A_0p333-P2B_0p333-P3A_0p333
    (MLflow model names may not contain '.')."""
    parts = [f"{k}_{v:.3f}".replace(".", "p") for k, v in sorted(weights.items()) if v > 0]
    return "psoups-" + "-".join(parts)


class Souper:
    """Merges soups from the trained adapters on the shared SFT base."""

    def __init__(self, cfg, sft_dir, adapters: dict[str, Path]):
        self.cfg = cfg
        self.base_model, self.tokenizer = load_pretrained(sft_dir)
        self.base_model.eval()
        self.adapters = {name: LoraAdapter.from_dir(path) for name, path in adapters.items()}

    def model(self, weights: dict[str, float], method: str | None = None) -> torch.nn.Module:
        """The soup Σ wᵢ πᵢ by ``method`` (default: the config's merge method)."""
        # the base module itself (not a clone of its state): tied weights and each module's type
        # stay visible to the merge, so an adapter on a tied embedding also updates the head
        return soup_model(method or self.cfg.merge_method, self.base_model, weights,
                          adapters={k: self.adapters[k] for k in weights}, density=self.cfg.merge_density)


# ---------------------------------------------------------------- in-process: what a worker runs

def seed_eval_config(cfg, k: int) -> "ev.EvalConfig":
    """How seed k's generations are sampled (every arm of that seed alike)."""
    return dataclasses.replace(ev.for_seeds(cfg.eval, cfg.seeds), seed=cfg.eval.seed + cfg.seed + k)


def user_soup_score(cfg, souper: Souper, scorer, prompts: list[str], eval_cfg, report=None) -> float:
    """The extra user's soup (``user_weights``) judged as that user would (``user_target``):
    per response, its preferences' 0..1 rewards weighted by the target, averaged over the
    responses. Generated ``eval.batch_size`` prompts at a time, each batch with the seeds
    `judged_generations` gives it within the whole run, so ``report(prompts so far, score so
    far)`` after each batch (a sweep trial's progress) sees a prefix of the same score."""
    model = souper.model(cfg.user_weights)
    rewards: list[float] = []
    for start in range(0, len(prompts), eval_cfg.batch_size):
        chunk = prompts[start:start + eval_cfg.batch_size]
        _, scores = ev.judged_generations(scorer, model, souper.tokenizer, chunk,
                                          dataclasses.replace(eval_cfg, seed=eval_cfg.seed + start))
        rewards += [target_score(cfg.user_target, s) for s in scores]
        if report is not None:
            report(start + len(chunk), sum(rewards) / len(rewards))
    return sum(rewards) / len(rewards)


def target_score(target: dict[str, float], scores: dict[str, float]) -> float:
    """A user's 0..1 reward of one judged text: its preferences' rewards, weighted by ``target``."""
    from raypref.data.labelling import preference_reward

    total = sum(target.values())
    return sum(w * preference_reward(p, scores) for p, w in target.items()) / total


def heldout_accuracy(cfg, sft_dir, adapter: Path, pairs, name: str,
                     device: torch.device = torch.device("cpu")) -> dict[str, float]:
    from peft import PeftModel

    base, tokenizer = load_pretrained(sft_dir)
    model = PeftModel.from_pretrained(base, str(adapter)).to(device)
    result = evaluate_pairs(model, tokenizer, pairs, cfg.training.beta,
                            max_length=cfg.training.max_length)
    _log(f"    {name}: held-out reward accuracy {result['reward_accuracy']:.3f}")
    return result


def evaluate_seed(cfg, k, sft_dir, trained, scorer, world, prompts, prefs, combos, with_pmorl,
                  device: torch.device = torch.device("cpu"), models_dir: Path | None = None,
                  sweep_prompts: list[str] | None = None) -> dict:
    """Seed k's judged scores of every arm, its weight sweep, a few samples and its soups
    ({name: weights}); with ``models_dir``, those soups are also written there (merged).
    The sweep is judged on ``sweep_prompts`` (default ``prompts``) with the sweep's samples
    (`ev.sweep_design`), SFT too where that design differs ("sweep_sft_quality")."""
    eval_cfg = seed_eval_config(cfg, k)
    sweep_cfg = ev.sweep_design(eval_cfg)
    sweep_prompts = prompts if sweep_prompts is None else sweep_prompts
    souper = Souper(cfg, sft_dir, {p: trained[p] for p in prefs})
    base_on_device = []  # the base stays on the CPU for merging; a copy generates on a GPU

    def on_device(model):
        if device.type == "cpu":
            return model
        if model is souper.base_model:
            if not base_on_device:
                base_on_device.append(copy.deepcopy(model).to(device))
            return base_on_device[0]
        return model.to(device)

    def generate(model, instruction=None):
        return ev.judged_generations(scorer, on_device(model), souper.tokenizer, prompts, eval_cfg,
                                     instruction)

    _, sft = generate(souper.base_model)
    if sweep_prompts == prompts and sweep_cfg == eval_cfg:
        sweep_generate, sweep_sft = generate, sft
    else:
        def sweep_generate(model):
            return ev.judged_generations(scorer, on_device(model), souper.tokenizer, sweep_prompts, sweep_cfg)

        _, sweep_sft = sweep_generate(souper.base_model)
    sweep = _weight_sweep(cfg, souper, scorer, sweep_generate, prefs, k, sweep_sft)
    arms = [SOUPS] + [ev.SOUP_ARMS[a] for a in cfg.eval.arms
                      if not (a == "ab_avg" and cfg.merge_method == "lora_factors_linear")]
    names = arms + [n for n, on in (("SFT", "sft" in cfg.baselines),
                                    ("Prompting", "prompting" in cfg.baselines),
                                    (PMORL, with_pmorl)) if on]
    methods = {n: {} for n in names}
    pmorl_model = _pmorl_model(sft_dir, trained[PMORL]) if with_pmorl else None
    samples, soups = {}, {}
    hf_base = bool(cfg.base_policy)
    for combo in combos:
        weights = {p: 1.0 / len(combo) for p in combo}
        soups[soup_name(weights)] = weights
        instruction = ev.instruction_text(world, combo, hf_base)
        soup = souper.model(weights)
        for name in names:
            if name == "SFT":
                texts, methods[name][combo] = None, sft
                continue
            model = {SOUPS: soup, ev.SOUP_ARMS["instructed"]: soup, PMORL: pmorl_model,
                     "Prompting": souper.base_model}.get(name)
            if name == ev.SOUP_ARMS["ab_avg"]:
                model = souper.model(weights, "lora_factors_linear")
            instructed = name in (ev.SOUP_ARMS["instructed"], "Prompting", PMORL)
            texts, methods[name][combo] = generate(model, instruction if instructed else None)
            if k == 0:
                samples[f"{name} {'+'.join(combo)}"] = texts[:3]
        _log(f"    seed {k}: judged {'+'.join(combo)}")
    user_score = None
    if cfg.user_weights:
        if set(cfg.user_weights) <= set(prefs):
            soups[soup_name(cfg.user_weights)] = dict(cfg.user_weights)
            if cfg.user_target:
                user_score = user_soup_score(cfg, souper, scorer, prompts, eval_cfg)
                _log(f"    seed {k}: the user's soup {cfg.user_weights} scores {user_score:.4f} "
                     f"for the user {cfg.user_target}")
        else:
            _log(f"    not building the user soup {cfg.user_weights}: "
                 f"{sorted(set(cfg.user_weights) - set(prefs))} failed to train")
    saved = write_soups(souper, soups, models_dir) if models_dir is not None else {}
    return {"methods": methods, "sft": sft, "sweep": sweep, "samples": samples,
            "soups": soups, "saved": saved, "user_score": user_score,
            "sweep_sft_quality": ev.mean_scores(sweep_sft)["quality"]}


def _pmorl_model(sft_dir, adapter: Path) -> torch.nn.Module:
    from peft import PeftModel

    base, _ = load_pretrained(sft_dir)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


def _weight_sweep(cfg, souper, scorer, generate, prefs, k, sft) -> dict:
    """For each dimension: judge score of its attribute (and quality) vs the merge weight of
    the preference raising it (other dimensions held at 50/50, or left out with
    ``eval.sweep_alone``). Each point's answers' attribute values are kept beside SFT's
    (``sft``: its judged answers), for quality at a matched attribute level
    (`compare.sweep_over_seeds`), and their quality, so a part of the design can be read again."""
    dims = ev.dimensions_of(prefs)
    sweep = {}
    for dim, (up, down) in dims.items():
        key = scorer.sweep_key(up)
        values, quality, answers, answer_quality = [], [], [], []
        for t in cfg.eval.weight_grid:
            _, scores = generate(souper.model(ev.sweep_weights(dims, dim, t, alone=cfg.eval.sweep_alone)))
            means = ev.mean_scores(scores)
            values.append(means[key])
            quality.append(means["quality"])
            answers.append([s[key] for s in scores])
            answer_quality.append([s["quality"] for s in scores])
        sweep[dim] = {"attribute": key, "raised_by": up, "lowered_by": down,
                      "weights": list(cfg.eval.weight_grid), "scores": values, "quality": quality,
                      "answer_values": answers, "answer_quality": answer_quality,
                      "sft_values": [s[key] for s in sft], "sft_quality_values": [s["quality"] for s in sft]}
        _log(f"    seed {k} {dim}: {key} = " + ", ".join(f"{v:.3f}" for v in values)
             + ", quality = " + ", ".join(f"{q:.3f}" for q in quality)
             + f" for w({up}) = {cfg.eval.weight_grid}")
    return sweep


def write_soups(souper: Souper, soups: dict[str, dict[str, float]], models_dir: Path) -> dict[str, str]:
    """Each soup merged and saved as a safetensors folder with its soup_weights.json: {name: folder}."""
    saved = {}
    for name, weights in soups.items():
        path = save_pretrained_safetensors(souper.model(weights), souper.tokenizer, Path(models_dir) / name)
        atomic.write_text(path / "soup_weights.json", json.dumps(weights, indent=2))
        saved[name] = str(path)
    return saved


# ---------------------------------------------------------------- on the workers

def actor_options(eval_cfg, cluster: dict[str, float]) -> dict:
    """Ray options of a seed's evaluation actor on ``cluster`` (``ray.cluster_resources()``):
    a GPU when asked or ("auto") when the cluster has one; ``num_cpus`` capped at the cluster's."""
    gpus = eval_cfg.num_gpus
    if gpus == "auto":
        gpus = 1.0 if cluster.get("GPU", 0.0) >= 1.0 else 0.0
    cpus = min(float(eval_cfg.num_cpus), cluster.get("CPU", 0.0)) or float(eval_cfg.num_cpus)
    return {"num_cpus": cpus, "num_gpus": float(gpus)}


class SeedEvaluator:
    """One seed's evaluation on a worker: the judge is loaded once, when the actor starts."""

    def __init__(self, cfg, sft_dir: str, world, threads: int):
        torch.set_num_threads(max(1, threads))  # what the actor's CPUs allow, not the node's cores
        use_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.device = torch.device("cuda") if use_gpu else torch.device("cpu")
        self.cfg, self.sft_dir, self.world = cfg, sft_dir, world
        self.scorer = ev.make_scorer(cfg.eval, world, cfg.preferences, device=self.device, base=sft_dir)

    def heldout_accuracy(self, k: int, adapters: dict[str, Path], held_out: dict) -> dict:
        from raypref.experiments.soups.training import run_name

        return {p: heldout_accuracy(self.cfg, self.sft_dir, adapters[p], held_out[p], run_name(p, k),
                                    self.device) for p in adapters}

    def evaluate(self, k, trained, prompts, prefs, combos, with_pmorl, models_dir, sweep_prompts=None) -> dict:
        return evaluate_seed(self.cfg, k, self.sft_dir, trained, self.scorer, self.world, prompts,
                             prefs, combos, with_pmorl, self.device, models_dir, sweep_prompts)

    def device_name(self) -> str:
        return str(self.device)


def evaluate_on_workers(cfg, sft_dir, world, trained: list[dict], held_out: list[dict], prompts,
                        prefs, combos, with_pmorl, models_dir: Path,
                        sweep_prompts: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """(held-out accuracy per seed, evaluation per seed), each seed in its own actor; seed 0's
    actor also writes the merged soups to ``models_dir`` (its result's "saved")."""
    options = actor_options(cfg.eval, ray.cluster_resources())
    actor_cls = ray.remote(SeedEvaluator).options(**options)
    threads = int(options["num_cpus"])
    _log(f"    evaluating {cfg.seeds} seed(s) on Ray workers, one actor each "
         f"({options['num_cpus']:g} CPU, {options['num_gpus']:g} GPU)")
    actors, pending = [], {}
    for k in range(cfg.seeds):
        actor = actor_cls.remote(cfg, str(sft_dir), world, threads)
        accuracy = actor.heldout_accuracy.remote(k, {p: trained[k][p] for p in prefs},
                                                 {p: held_out[k][p] for p in prefs})
        result = actor.evaluate.remote(k, trained[k], prompts, prefs, combos, with_pmorl,
                                       models_dir if k == 0 else None, sweep_prompts)
        actors.append(actor)
        pending[result] = (k, accuracy)
    accuracies, seeds = [None] * cfg.seeds, [None] * cfg.seeds
    try:
        while pending:
            # an actor keeps its CPUs / GPU until killed: end each as it finishes, so that the
            # next seed's actor can start where the cluster holds fewer than all at once
            done, _ = ray.wait(list(pending), num_returns=1)
            k, accuracy = pending.pop(done[0])
            accuracies[k], seeds[k] = ray.get(accuracy), ray.get(done[0])
            ray.kill(actors[k])
    finally:
        for actor in actors:
            ray.kill(actor)
    return accuracies, seeds
