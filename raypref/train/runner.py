"""The one place that runs a training loop on N workers: Ray Train + DeepSpeed ZeRO.

A method describes *what* to train with a `LoopSpec` (train/spec.py); `run` does the rest on
every worker: one DeepSpeed engine per trainable role (ZeRO 0-3, AdamW with the spec's
parameter groups, warm-up schedule, clipping), frozen roles beside them, progress every
`log_every` steps and metrics (evaluation included) reported to Ray between checkpoints,
checkpoints every `checkpoint_every` steps (DeepSpeed state of each trainable role, the spec's
state and the RNG states of every worker, trainable weights as safetensors), resume after a
worker failure from the checkpoint Ray hands back, and the final export to
`<storage_path>/<name>/final`. (Ray commits a checkpoint when its controller has collected
every worker's report of it; a worker that dies within a poll interval of reporting can take
that checkpoint with it, and the run then resumes from the one before.)

A run is identified by its fingerprint (train/fingerprint.py): re-running a name with a
different config, data, base model or checkpoint layout refuses to resume (other code resumes
with a warning). Checkpoints hold no pickles (train/state_io.py); a damaged latest checkpoint
falls back to the one before.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from raypref import atomic, ray_session
from raypref.config import check_fields
from raypref.models.factory import enable_gradient_checkpointing
from raypref.train import storage
from raypref.train.fingerprint import check_fingerprint, run_fingerprint
from raypref.train.spec import LoopSpec, Role, StepContext
from raypref.train.state_io import (checkpoint_problem, load_deepspeed_safely, load_state,
                                    refuse_pickles, save_state)

HISTORY_FILE = "metrics.json"  # the metrics history, for the driver (rank 0 writes it)
FINAL_DIR = "final"
SCHEDULES = ("warmup_decay", "warmup_constant")


@dataclass
class RunnerConfig:
    """How to run a loop: workers, DeepSpeed optimisation, checkpoints, failures."""

    num_workers: int = 1  # Ray Train workers, one process each
    cpus_per_worker: float = 1.0  # fractions let many small runs share a node
    use_gpu: bool = False
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    lr: float = 1e-3  # peak learning rate (roles and parameter groups may set their own)
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear from 0 (DeepSpeed's schedule: step 1 runs at lr 0)
    schedule: str = "warmup_decay"  # "warmup_decay" (linear to 0 at max_steps) or "warmup_constant"
    max_steps: int = 100  # optimizer steps
    micro_batch_size: int = 8  # per worker
    grad_accum: int = 1
    grad_clip: float = 1.0
    checkpoint_every: int = 50  # optimizer steps; the last step is always checkpointed
    keep_checkpoints: int = 2
    eval_every: int = 0  # optimizer steps between spec.evaluate calls; 0 = only at the end
    max_failures: int = 1  # whole-group restarts Ray Train may make
    storage_path: str = "runs"  # a local folder, a shared filesystem path or a URI (s3://, gs://)
    name: str = "run"  # a run with the same storage_path/name resumes (if its fingerprint matches)
    seed: int = 0
    bf16: bool = False  # off by default: CPU runs stay in fp32
    fp16: bool = False  # GPUs without bf16 (V100, T4): fp16 with dynamic loss scaling
    gradient_checkpointing: bool = False  # trainable roles recompute activations in backward
    log_every: int = 10  # rank 0 prints progress and reports metrics every this many steps
    strict_code: bool = False  # refuse to resume a run trained by another raypref code version

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks = [
            ("num_workers", self.num_workers >= 1, "must be >= 1"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"),
            ("zero_stage", self.zero_stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
            ("lr", self.lr > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("schedule", self.schedule in SCHEDULES, f"must be one of {SCHEDULES}"),
            ("max_steps", self.max_steps >= 1, "must be >= 1"),
            ("micro_batch_size", self.micro_batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 = no clipping)"),
            ("checkpoint_every", self.checkpoint_every >= 1, "must be >= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
            ("eval_every", self.eval_every >= 0, "must be >= 0 (0 = only at the end)"),
            ("max_failures", self.max_failures >= -1, "must be >= -1 (-1 = unlimited)"),
            ("storage_path", bool(self.storage_path), "must name a folder or URI"),
            ("name", storage.is_run_name(self.name), storage.RUN_NAME_RULE),
            ("log_every", self.log_every >= 1, "must be >= 1"),
            ("fp16", not (self.fp16 and self.bf16), "cannot be on with bf16: choose one precision"),
            ("fp16", not self.fp16 or self.use_gpu, "needs use_gpu (DeepSpeed's fp16 is for GPUs)"),
        ]
        check_fields("RunnerConfig", self, checks)


@dataclass
class Optimization:
    """The batch and schedule settings every recipe's training config shares (recipe configs
    subclass it); `runner_config` turns them, with `Resources`, into a RunnerConfig."""

    steps: int = 200  # optimizer steps
    micro_batch_size: int = 8  # examples (pairs) per micro-batch per worker
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # peak learning rate
    warmup_steps: int = 10  # linear warm-up from 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # gradient-norm clipping (0 = none)

    def validate(self, where: str = "training") -> None:
        checks = [("steps", self.steps >= 1, "must be >= 1"),
                  ("micro_batch_size", self.micro_batch_size >= 1, "must be >= 1"),
                  ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
                  ("lr", self.lr > 0, "must be > 0"),
                  ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
                  ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
                  ("grad_clip", self.grad_clip >= 0, "must be >= 0 (0 = no clipping)")]
        check_fields(where, self, checks)


@dataclass
class Resources:
    """Ray resources and fault tolerance of one run."""

    num_workers: int = 1  # Ray Train workers (one per GPU on a cluster)
    cpus_per_worker: float = 1.0  # fractions let several small runs share a node
    use_gpu: bool = False
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 (LoRA states are tiny; 2/3 for big bases)
    bf16: bool = False  # on for GPUs that support it
    fp16: bool = False  # GPUs without bf16: fp16 with dynamic loss scaling (exclusive with bf16)
    gradient_checkpointing: bool = False  # less activation memory for about 30% more compute
    max_failures: int = 1  # restarts from the latest checkpoint before the run fails
    checkpoint_every: int = 50  # optimizer steps between checkpoints
    eval_every: int = 0  # optimizer steps between evaluations (0 = only at the end)
    strict_code: bool = False  # refuse to resume a run trained by another raypref code version

    def validate(self, where: str = "resources") -> None:
        checks = [("num_workers", self.num_workers >= 1, "must be >= 1"),
                  ("cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"),
                  ("zero_stage", self.zero_stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
                  ("max_failures", self.max_failures >= -1, "must be >= -1 (-1 = unlimited)"),
                  ("checkpoint_every", self.checkpoint_every >= 1, "must be >= 1"),
                  ("eval_every", self.eval_every >= 0, "must be >= 0 (0 = only at the end)")]
        check_fields(where, self, checks)


def runner_config(training: Optimization, resources: Resources, *, name: str, storage_path: str,
                  seed: int = 0, log_every: int | None = None) -> RunnerConfig:
    """The one way to build a RunnerConfig from a recipe's training settings and resources."""
    cfg = RunnerConfig(
        num_workers=resources.num_workers, cpus_per_worker=resources.cpus_per_worker,
        use_gpu=resources.use_gpu, zero_stage=resources.zero_stage, bf16=resources.bf16,
        fp16=resources.fp16, gradient_checkpointing=resources.gradient_checkpointing,
        max_failures=resources.max_failures, checkpoint_every=resources.checkpoint_every,
        eval_every=resources.eval_every, strict_code=resources.strict_code,
        lr=training.lr, weight_decay=training.weight_decay, warmup_steps=training.warmup_steps,
        max_steps=training.steps, micro_batch_size=training.micro_batch_size,
        grad_accum=training.grad_accum, grad_clip=training.grad_clip,
        storage_path=storage_path, name=name, seed=seed,
        log_every=log_every or max(1, training.steps // 10))
    cfg.validate()
    return cfg


@dataclass
class RunResult:
    """What a finished run left behind."""

    final_step: int
    metrics: list[dict[str, float]] = field(default_factory=list)  # one dict per optimizer step
    export_path: Path | str | None = None  # what LoopSpec.export wrote (a str for a URI)
    checkpoint_path: Path | None = None  # last reported checkpoint (local copy)


def deepspeed_config(cfg: RunnerConfig, group_lrs: list[float] | None = None) -> dict:
    """The DeepSpeed config dict for a RunnerConfig; ``group_lrs`` are the peak rates of the
    optimizer's parameter groups (default: one group at cfg.lr)."""
    peak = list(group_lrs) if group_lrs else cfg.lr
    scheduler_params = {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": peak,  # a list: one peak per parameter group
        "warmup_num_steps": max(1, cfg.warmup_steps),  # DeepSpeed rejects 0
        "warmup_type": "linear",
    }
    if cfg.schedule == "warmup_decay":
        scheduler = {"type": "WarmupDecayLR",
                     "params": {**scheduler_params, "total_num_steps": cfg.max_steps}}
    else:
        scheduler = {"type": "WarmupLR", "params": scheduler_params}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW on CPU: DeepSpeed's FusedAdam needs CUDA
            "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "torch_adam": not cfg.use_gpu},
        },
        "scheduler": scheduler,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16},
        # loss_scale 0 = dynamic: start at 2**16, halve on overflow (the step is skipped)
        "fp16": {"enabled": cfg.fp16, "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # progress is printed by the runner
        "wall_clock_breakdown": False,
    }


def run(spec: LoopSpec, cfg: RunnerConfig, datasets: dict | None = None, dataset_config=None,
        data_fingerprint: dict | None = None, restart: bool = False,
        callbacks: list | None = None, live_metrics=None) -> RunResult:
    """Train `spec` on cfg.num_workers Ray Train workers; resume the run if it already exists.

    `datasets` (name -> ray.data.Dataset) are sharded to the workers for
    `ray.train.get_dataset_shard(name)`; `data_fingerprint` describes them for the run's
    fingerprint. A run folder made with another fingerprint raises `RunMismatch`, unless
    `restart` (then the old run is deleted and training starts over). Raises
    ray.train.TrainingFailedError when the workers fail more than cfg.max_failures times.
    `callbacks` (ray.train.UserCallback, e.g. Tune's report callback) see every report: the
    metrics of each `log_every` / `eval_every` step as well as those sent with checkpoints.
    `live_metrics` (a `tracking.LiveMetrics`, e.g. `tracking.live_metrics()` inside the job's
    run): rank 0 logs the step rows there at each of those reports, so the curves grow while
    the run trains (a resumed run logs the steps after its checkpoint again).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg.validate()
    _check_roles(spec)
    # Ray Train gives a worker group 60 s to start, then starts it over; on a busy small machine
    # importing torch + DeepSpeed in a new worker can take longer, and every retry starts over
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    # the controller collects a worker's report every 2 s by default and a worker holds at most
    # one waiting report, so a metrics report every few fast steps idled the worker up to 2 s
    # (32% of bench/dpo_throughput.py's window); a 0.2 s poll costs the controller little
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ray_session.init()  # a no-op when Ray is up; else a local Ray pinned to its own address
    root = storage.resolve(cfg.storage_path)
    check_fingerprint(root, cfg.name, run_fingerprint(spec, cfg, data_fingerprint), restart=restart,
                      strict_code=cfg.strict_code)
    loop_config = {"spec": spec, "cfg": asdict(cfg), "storage": root, "live_metrics": live_metrics}
    make_trainer = lambda: TorchTrainer(  # noqa: E731 (a fresh trainer per attempt)
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=root,  # a URI stays a URI: Ray Train writes checkpoints there
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # e.g. data.pipeline.ExactSplitDataConfig: Train's default split drops rows to even out
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )
    with ray_session.watch_resources():  # says what a worker group waits for, and stops it
        result = fit_surviving_lost_placement_groups(make_trainer, cfg.name)
    history: list[dict[str, float]] = []
    checkpoint_path = None
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as local:  # downloads from a URI
            history = _read_history(Path(local))
            checkpoint_path = Path(local) if not storage.is_uri(root) else None
    return RunResult(
        final_step=int(history[-1]["step"]) if history else 0,
        metrics=history,
        export_path=export_path(root, cfg.name),
        checkpoint_path=checkpoint_path,
    )


# Ray Train's PlacementGroupCleaner takes a controller the state API cannot find in time for a
# dead one and removes its placement group, killing a healthy run's workers (seen on a loaded
# 2-core machine; ray-project/ray#65447's review names the cause). Ray ends such a run with a
# ControllerError that its FailureConfig does not retry.
LOST_PLACEMENT_GROUP = "placement group was removed"
LOST_PLACEMENT_GROUP_RETRIES = 2


def fit_surviving_lost_placement_groups(make_trainer, name: str,
                                        retries: int = LOST_PLACEMENT_GROUP_RETRIES):
    """`make_trainer().fit()`, fitted again (a fresh trainer resumes from the run's latest
    checkpoint) when Ray removed the run's placement group under it; any other error, or the
    same one more than `retries` times, is raised."""
    from ray.train import ControllerError

    for attempt in range(retries + 1):
        try:
            return make_trainer().fit()
        except ControllerError as exc:
            if LOST_PLACEMENT_GROUP not in str(exc) or attempt == retries:
                raise
            print(f"[runner] WARNING {name}: Ray removed the run's placement group while it "
                  f"trained (attempt {attempt + 1}); resuming from its latest checkpoint",
                  flush=True)


def export_path(root: str, name: str) -> Path | str | None:
    """Where a run's export is: ``<root>/<name>/final`` (a swap a crash interrupted is finished
    first), or for a URI the prefix its marker publishes; None before the run exported."""
    target = storage.join(root, name, FINAL_DIR)
    if storage.is_uri(target):
        return storage.published(target)
    atomic.recover_dir(target)
    return Path(target) if Path(target).exists() else None


def _check_roles(spec: LoopSpec) -> None:
    roles = spec.roles()
    if not roles or not any(r.trainable for r in roles.values()):
        raise ValueError(f"{type(spec).__name__}.roles(): at least one trainable role is needed")
    for name, role in roles.items():
        if not isinstance(role, Role):
            raise TypeError(f"{type(spec).__name__}.roles()[{name!r}]: expected a Role")
        if role.lr is not None and role.lr <= 0:
            raise ValueError(f"{type(spec).__name__}.roles()[{name!r}].lr={role.lr}: must be > 0")


# ---------------------------------------------------------------- inside each worker

def _train_loop(loop_config: dict) -> None:
    """Ray Train worker function: build the engines, resume, train, checkpoint, export."""
    cfg = RunnerConfig(**loop_config["cfg"])
    spec: LoopSpec = loop_config["spec"]
    if not cfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed picks an accelerator
    import deepspeed
    import ray.train

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    # Ray Train already made the torch process group (gloo on CPU); DeepSpeed reuses it.
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")

    engines, models = _build_roles(spec, cfg, deepspeed)
    ctx = StepContext(step=1, max_steps=cfg.max_steps, rank=rank, world_size=world_size,
                      micro_batch_size=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
                      seed=cfg.seed, models=models)
    torch.manual_seed(cfg.seed * 1_000_003 + rank)  # each worker samples its own stream
    history: list[dict[str, float]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        checkpoint = _restorable(checkpoint, rank, cfg.name)
        with checkpoint.as_directory() as ckpt_dir:
            history = _restore(Path(ckpt_dir), engines, spec, rank)
    start_step = next(iter(engines.values())).global_steps  # optimizer steps already done
    if rank == 0:
        print(f"[runner] {cfg.name}: starting at step {start_step}/{cfg.max_steps} on "
              f"{world_size} worker(s), ZeRO-{cfg.zero_stage}, roles "
              f"{', '.join(spec.roles())}", flush=True)
    writer = None
    if rank == 0 and loop_config.get("live_metrics") is not None:
        from raypref.tracking import StepMetricsWriter

        writer = StepMetricsWriter(loop_config["live_metrics"], already_logged=len(history))
    started = time.perf_counter()

    ctx.step = start_step + 1
    micro_batches = _endless(spec, ctx)
    for step in range(start_step + 1, cfg.max_steps + 1):
        ctx.step = step
        lr = next(iter(engines.values())).get_lr()[0]  # this step's rate (the scheduler moves after it)
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            losses, metrics = spec.loss(next(micro_batches), ctx)
            losses = _per_role(losses, engines, spec)
            for role, engine in engines.items():
                engine.backward(losses[role])
            for engine in engines.values():
                engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            values = {"loss": sum(float(v) for v in losses.values()), **metrics}
            if len(losses) > 1:
                values.update({f"loss.{r}": float(v) for r, v in losses.items()})
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        row = {"step": step, "lr": lr,
               **_mean_over_ranks({k: v / cfg.grad_accum for k, v in sums.items()})}
        last = step == cfg.max_steps
        if (cfg.eval_every and step % cfg.eval_every == 0) or last:
            row.update({f"eval.{k}": v for k, v in _evaluate(spec, ctx).items()})
        history.append(row)
        reported = True
        if step % cfg.checkpoint_every == 0 or last:
            _save_and_report(engines, spec, cfg, rank, step, history, loop_config["storage"])
        elif step % cfg.log_every == 0 or any(k.startswith("eval.") for k in row):
            ray.train.report(row)  # a barrier on every worker: Tune sees it between checkpoints
        else:
            reported = False
        if writer is not None and reported:
            writer.write(history)
        if rank == 0 and (step % cfg.log_every == 0 or last):
            print(f"[runner] {cfg.name} step {step}/{cfg.max_steps}: "
                  + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "step")
                  + _throughput(step - start_step, cfg.max_steps - step, time.perf_counter() - started),
                  flush=True)

    _export(spec, engines, models, cfg, rank, loop_config["storage"])


def _throughput(done: int, left: int, seconds: float) -> str:
    """The progress line's tail, e.g. ' | 2.31 steps/s, ETA 0:01:05' (this session's steps only)."""
    if done <= 0 or seconds <= 0:
        return ""
    rate = done / seconds
    eta = int(round(left / rate))
    return f" | {rate:.3g} steps/s, ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"


def _build_roles(spec: LoopSpec, cfg: RunnerConfig, deepspeed) -> tuple[dict, dict]:
    """One DeepSpeed engine per trainable role (in declaration order); frozen roles as plain
    eval-mode modules on the worker's device. Returns (engines, models by role)."""
    engines, models = {}, {}
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    for name, role in spec.roles().items():
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = spec.build_model(name)
        if not role.trainable:  # reference, reward, judge: in the run's precision
            model.requires_grad_(False)
            half = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
            models[name] = model.to(device, dtype=half).eval()
            continue
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        groups = spec.param_groups(name, model)
        default_lr = role.lr if role.lr is not None else cfg.lr
        default_wd = role.weight_decay if role.weight_decay is not None else cfg.weight_decay
        groups = [{**g, "lr": g.get("lr", default_lr), "weight_decay": g.get("weight_decay", default_wd)}
                  for g in groups if list(g["params"])]
        if not groups:
            raise ValueError(f"{type(spec).__name__}: role {name!r} has no trainable parameters")
        ds_config = deepspeed_config(cfg, group_lrs=[g["lr"] for g in groups])
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
        _exclude_tied_frozen(engine)
        engines[name], models[name] = engine, engine.module
    # trainable roles first in ctx.models, so ctx.model is the first trainable one
    models = {**{n: models[n] for n in engines}, **{n: m for n, m in models.items() if n not in engines}}
    return engines, models


def _exclude_tied_frozen(engine) -> None:
    """DeepSpeed's exclude_frozen_parameters looks frozen parameters up by their first name only,
    so a tied alias (GPT-2's lm_head.weight = the frozen wte) of a LoRA's base is still written
    at every checkpoint. Drop every name a frozen parameter has."""
    original = engine.module_state_dict

    def module_state_dict(*args, exclude_frozen_parameters=False, **kwargs):
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters and state is not None:
            for name, param in engine.module.named_parameters(remove_duplicate=False):
                if not param.requires_grad:
                    state.pop(name, None)
        return state

    engine.module_state_dict = module_state_dict


def _per_role(losses, engines: dict, spec: LoopSpec) -> dict[str, torch.Tensor]:
    if isinstance(losses, torch.Tensor):
        if len(engines) != 1:
            raise TypeError(f"{type(spec).__name__}.loss returned one tensor; with trainable roles "
                            f"{list(engines)} it must return {{role: loss}}")
        return {next(iter(engines)): losses}
    missing = sorted(set(engines) - set(losses))
    if missing:
        raise KeyError(f"{type(spec).__name__}.loss returned no loss for trainable role(s) {missing}")
    return {role: losses[role] for role in engines}


def _endless(spec: LoopSpec, ctx: StepContext) -> Iterator[Any]:
    """spec.batches, restarted whenever it runs out (epochs); errors if it yields nothing."""
    while True:
        produced = False
        for batch in spec.batches(ctx):
            produced = True
            yield batch
        if not produced:
            raise RuntimeError(f"{type(spec).__name__}.batches(rank={ctx.rank}) yielded no batch")


def _evaluate(spec: LoopSpec, ctx: StepContext) -> dict[str, float]:
    trainable = [m for m in ctx.models.values() if m.training]
    for m in trainable:
        m.eval()
    try:
        with torch.no_grad():
            metrics = spec.evaluate(ctx)
    finally:
        for m in trainable:
            m.train()
    return _mean_over_ranks({k: float(v) for k, v in metrics.items()})


def _mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over the workers (every rank must pass the same keys)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, values)}


def _gathered(engines: dict, cfg: RunnerConfig):
    """Context in which every parameter is whole (ZeRO-3 partitions them); all ranks enter."""
    if cfg.zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    params = [p for engine in engines.values() for p in engine.module.parameters()]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


# ---------------------------------------------------------------- checkpoints

def _state_stem(rank: int) -> str:
    return f"worker_state_rank{rank}"  # .json + .safetensors (train/state_io.py)


def read_spec_state(ckpt_dir: str | Path, rank: int = 0) -> dict:
    """The spec state (``LoopSpec.state_dict``) a worker saved in a checkpoint of this runner,
    e.g. the dataset an RSF iteration held, for offline diagnostics."""
    if not (Path(ckpt_dir) / f"{_state_stem(rank)}.json").exists():
        refuse_pickles(ckpt_dir)
        raise FileNotFoundError(f"read_spec_state: {ckpt_dir} has no {_state_stem(rank)}.json")
    return load_state(ckpt_dir, _state_stem(rank))["spec"]


def _rng_state() -> dict:
    # numpy's and Python's states are tuples of ints and an array: save_state keeps them as is
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _weights_file(role: str, engines: dict) -> str:
    return "model.safetensors" if len(engines) == 1 else f"{role}.safetensors"


def _trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a checkpoint stores: every tensor of a fully trained model, only the trained
    ones of a model with frozen parts (a LoRA's base is rebuilt by build_model, not rewritten)."""
    trained = {name for name, p in module.named_parameters() if p.requires_grad}
    frozen = any(not p.requires_grad for p in module.parameters())
    # copies: ZeRO's flat buffers make tied weights views safetensors refuses
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()
            if not frozen or k in trained}


def _staging_dir(root: str, name: str) -> str | None:
    """Where a worker assembles a checkpoint before Ray copies it in: on the storage's own
    filesystem (a small system temp folder must not hold a second copy of a big checkpoint);
    a URI's checkpoints are assembled in the system temp folder, the only local disk we know."""
    if storage.is_uri(root):
        return None
    staging = Path(root, name, ".staging")
    staging.mkdir(parents=True, exist_ok=True)
    return str(staging)


def _save_and_report(engines: dict, spec: LoopSpec, cfg: RunnerConfig, rank: int, step: int,
                     history: list[dict[str, float]], root: str) -> None:
    """Every rank saves its DeepSpeed state, spec state and RNG into its own folder; Ray merges
    the folders into one checkpoint."""
    import ray.train
    from ray.train import Checkpoint
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix=f"ckpt-{step:06d}-rank{rank}-",
                                     dir=_staging_dir(root, cfg.name)) as tmp:
        for role, engine in engines.items():
            engine.save_checkpoint(tmp, tag=f"ds-{role}", exclude_frozen_parameters=True)
        worker_state = {"spec": spec.state_dict(), "rng": _rng_state(), "history": history}
        save_state(worker_state, tmp, _state_stem(rank))
        with _gathered(engines, cfg):
            if rank == 0:
                for role, engine in engines.items():
                    weights = Path(tmp) / _weights_file(role, engines)
                    partial = weights.with_suffix(".tmp")
                    save_file(_trainable_state(engine.module), str(partial))
                    os.replace(partial, weights)
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
        ray.train.report({**history[-1]}, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")


def _older_checkpoints(checkpoint) -> list:
    """The run's checkpoints before ``checkpoint`` (newest first), from its run folder."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    parent, _, own = checkpoint.path.rstrip("/").rpartition("/")
    infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < own), reverse=True)
    return [Checkpoint(path=f"{parent}/{n}", filesystem=checkpoint.filesystem) for n in names]


def _restorable(checkpoint, rank: int, name: str):
    """The checkpoint Ray hands back or, when any worker finds one of its files damaged, the
    newest older one every worker can read (a corrupt latest checkpoint would otherwise fail
    every retry). Every rank takes part: they must all resume from the same one."""
    import torch.distributed as dist

    reasons = []
    for candidate in [checkpoint, *_older_checkpoints(checkpoint)]:
        with candidate.as_directory() as local:
            problem = checkpoint_problem(local)
        readable = torch.tensor([0 if problem else 1])
        if dist.is_initialized():
            dist.all_reduce(readable, op=dist.ReduceOp.MIN)
        if readable.item():
            if reasons and rank == 0:
                print(f"[runner] {name}: resuming from {candidate.path} instead", flush=True)
            return candidate
        reasons.append(f"{candidate.path}: {problem or 'damaged on another worker'}")
        print(f"[runner] WARNING {name} (rank {rank}): checkpoint {candidate.path} cannot be "
              f"restored ({problem or 'another worker found a damaged file'}); trying the one "
              "before", flush=True)
    raise RuntimeError(f"run {name}: no checkpoint can be restored: {'; '.join(reasons)}")


def _restore(ckpt_dir: Path, engines: dict, spec: LoopSpec, rank: int) -> list[dict[str, float]]:
    refuse_pickles(ckpt_dir)
    for role, engine in engines.items():
        load_deepspeed_safely(engine)
        # frozen parameters were left out of the checkpoint: build_model made them already
        loaded, _ = engine.load_checkpoint(str(ckpt_dir), tag=f"ds-{role}",
                                           load_module_strict=False)
        if loaded is None:  # DeepSpeed only warns, and training would restart from step 0
            raise FileNotFoundError(f"checkpoint {ckpt_dir} has no DeepSpeed state ds-{role} "
                                    f"(rank {rank}): cannot resume")
    stem = _state_stem(rank)
    if not (ckpt_dir / f"{stem}.json").exists():
        raise FileNotFoundError(f"checkpoint {ckpt_dir} has no {stem}.json: it was written "
                                "with another number of workers")
    worker_state = load_state(ckpt_dir, stem)
    spec.load_state_dict(worker_state["spec"])
    _set_rng_state(worker_state["rng"])
    return list(worker_state["history"])


def _export(spec: LoopSpec, engines: dict, models: dict, cfg: RunnerConfig, rank: int,
            root: str) -> None:
    target = storage.join(root, cfg.name, FINAL_DIR)
    with _gathered(engines, cfg):
        if rank != 0:
            return
        if storage.is_uri(target):
            with tempfile.TemporaryDirectory(prefix="raypref-export-") as tmp:
                spec.export(models, Path(tmp))
                target = storage.publish_dir(Path(tmp), target)
        else:
            atomic.replace_dir(target, lambda tmp: spec.export(models, tmp))
        print(f"[runner] {cfg.name}: done, exported to {target}", flush=True)


def _read_history(checkpoint_dir: Path) -> list[dict[str, float]]:
    path = checkpoint_dir / HISTORY_FILE
    return json.loads(path.read_text()) if path.exists() else []
