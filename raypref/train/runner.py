"""The one place that runs a training loop on N workers: Ray Train + DeepSpeed ZeRO.

A job describes *what* to train with a `LoopSpec` (model, loss, batches, export); `run` does
the rest on every worker: DeepSpeed engine (ZeRO stage 0-3, AdamW, warm-up schedule, clipping),
checkpoints every `checkpoint_every` steps (DeepSpeed state on every rank + the weights as
`model.safetensors` from rank 0), resume after a worker failure from the checkpoint Ray hands
back, and the final export to `<storage_path>/<name>/final`.

The metrics history travels inside each checkpoint (Ray keeps only metrics reported with a
checkpoint), so after a resume it holds each step exactly once.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from raypref.models.factory import write_dir_atomically

CHECKPOINT_TAG = "ds"  # DeepSpeed's sub-folder inside each reported checkpoint
WEIGHTS_FILE = "model.safetensors"
HISTORY_FILE = "metrics.json"  # the metrics history, for the driver (rank 0 writes it)
FINAL_DIR = "final"


@dataclass
class RunnerConfig:
    """How to run a loop: workers, DeepSpeed optimisation, checkpoints, failures."""

    num_workers: int = 1  # Ray Train workers, one process each
    cpus_per_worker: float = 1.0  # fractions let many small runs share a node
    use_gpu: bool = False
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10  # linear from 0 (DeepSpeed's schedule: step 1 runs at lr 0)
    schedule: str = "warmup_decay"  # "warmup_decay" (linear to 0 at max_steps) or "warmup_constant"
    max_steps: int = 100  # optimizer steps
    micro_batch_size: int = 8  # per worker
    grad_accum: int = 1
    grad_clip: float = 1.0
    checkpoint_every: int = 50  # optimizer steps; the last step is always checkpointed
    keep_checkpoints: int = 2
    max_failures: int = 1  # whole-group restarts Ray Train may make
    storage_path: str = "runs"
    name: str = "run"  # a run with the same storage_path/name resumes: use unique names
    seed: int = 0
    bf16: bool = False  # off by default: CPU runs stay in fp32
    log_every: int = 10  # rank 0 prints progress every this many steps

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks = [
            ("num_workers", self.num_workers >= 1, "must be >= 1"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"),
            ("zero_stage", self.zero_stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
            ("lr", self.lr > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("schedule", self.schedule in ("warmup_decay", "warmup_constant"),
             "must be 'warmup_decay' or 'warmup_constant'"),
            ("max_steps", self.max_steps >= 1, "must be >= 1"),
            ("micro_batch_size", self.micro_batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("checkpoint_every", self.checkpoint_every >= 1, "must be >= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
            ("max_failures", self.max_failures >= -1, "must be >= -1 (-1 = unlimited)"),
            ("name", bool(self.name) and "/" not in self.name, "must be a non-empty folder name"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"RunnerConfig.{name}={getattr(self, name)!r}: {rule}")


class LoopSpec:
    """What to train. Subclass it; instances are pickled to every worker, keep them small.

    The model may be a peft model: only parameters with requires_grad go to the optimizer.
    """

    def build_model(self) -> torch.nn.Module:
        """The model to train; called on every worker after seeding torch with cfg.seed."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch and scalar metrics (same keys on every rank)."""
        raise NotImplementedError

    def batches(self, rank: int, world_size: int, start_step: int) -> Iterator[Any]:
        """Micro-batches of this rank, beginning with the first one of optimizer step
        `start_step` (= steps already done; > 0 after a resume). Each optimizer step takes
        `grad_accum` of them. When it runs out the runner calls it again with the same
        arguments (next epoch), so a finite iterator over a dataset shard is fine.
        Read `ray.train.get_dataset_shard(name)` here, or generate batches in memory."""
        raise NotImplementedError

    def export(self, model: torch.nn.Module, out_dir: Path) -> None:
        """Write the trained model to out_dir (rank 0 only; parameters already gathered)."""
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(out_dir)
        else:
            from safetensors.torch import save_file

            save_model(model, str(out_dir / WEIGHTS_FILE))


@dataclass
class RunResult:
    """What a finished run left behind."""

    final_step: int
    metrics: list[dict[str, float]] = field(default_factory=list)  # one dict per optimizer step
    export_path: Path | None = None  # what LoopSpec.export wrote
    checkpoint_path: Path | None = None  # last reported checkpoint (DeepSpeed state + weights)


def deepspeed_config(cfg: RunnerConfig) -> dict:
    """The DeepSpeed config dict for a RunnerConfig."""
    scheduler_params = {
        "warmup_min_lr": 0.0,
        "warmup_max_lr": cfg.lr,
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
        "steps_per_print": 10**9,  # progress is printed by the runner
        "wall_clock_breakdown": False,
    }


def run(spec: LoopSpec, cfg: RunnerConfig, datasets: dict | None = None,
        dataset_config=None, callbacks: list | None = None) -> RunResult:
    """Train `spec` on cfg.num_workers Ray Train workers; resume the run if it already exists.

    `datasets` (name -> ray.data.Dataset) are sharded to the workers for
    `ray.train.get_dataset_shard(name)`. `callbacks` go to Ray Train's RunConfig (e.g. Tune's
    `TuneReportCallback` when a sweep trial runs the loop). Raises ray.train.TrainingFailedError when the
    workers fail more than cfg.max_failures times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg.validate()
    storage = Path(cfg.storage_path).expanduser().resolve()
    loop_config = {"spec": spec, "cfg": asdict(cfg), "storage": str(storage)}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # e.g. data.pipeline.ExactSplitDataConfig: Train's default split drops rows to even out
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )
    result = trainer.fit()
    checkpoint_path = Path(result.checkpoint.path) if result.checkpoint else None
    history = _read_history(checkpoint_path) if checkpoint_path else []
    export_path = storage / cfg.name / FINAL_DIR
    return RunResult(
        final_step=int(history[-1]["step"]) if history else 0,
        metrics=history,
        export_path=export_path if export_path.exists() else None,
        checkpoint_path=checkpoint_path,
    )


# ---------------------------------------------------------------- inside each worker

def _train_loop(loop_config: dict) -> None:
    """Ray Train worker function: build the engine, resume, train, checkpoint, export."""
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

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = spec.build_model()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg),
    )

    history: list[dict[str, float]] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            _, client_state = engine.load_checkpoint(ckpt_dir, tag=CHECKPOINT_TAG)
        history = list(client_state["history"])
    start_step = engine.global_steps  # restored from the checkpoint: optimizer steps done
    if rank == 0:
        print(f"[runner] {cfg.name}: starting at step {start_step}/{cfg.max_steps} "
              f"on {world_size} worker(s), ZeRO-{cfg.zero_stage}", flush=True)

    micro_batches = _endless(spec, rank, world_size, start_step)
    for step in range(start_step + 1, cfg.max_steps + 1):
        sums: dict[str, float] = {}
        lr = engine.get_lr()[0]  # the rate this step applies (the scheduler moves after it)
        for _ in range(cfg.grad_accum):
            loss, metrics = spec.loss(engine.module, next(micro_batches))
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary
            for key, value in {"loss": loss.item(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        metrics = _mean_over_ranks({k: v / cfg.grad_accum for k, v in sums.items()})
        history.append({"step": step, "lr": lr, **metrics})
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.max_steps):
            print(f"[runner] {cfg.name} step {step}: "
                  + " ".join(f"{k}={v:.4g}" for k, v in history[-1].items() if k != "step"),
                  flush=True)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            _save_and_report(engine, cfg, rank, step, history)

    final_dir = Path(loop_config["storage"]) / cfg.name / FINAL_DIR
    with _gathered(engine, cfg):
        if rank == 0:
            write_dir_atomically(final_dir, lambda tmp: spec.export(engine.module, tmp))
            print(f"[runner] {cfg.name}: done, exported to {final_dir}", flush=True)


def _endless(spec: LoopSpec, rank: int, world_size: int, start_step: int) -> Iterator[Any]:
    """spec.batches, restarted whenever it runs out (epochs); errors if it yields nothing."""
    iterator = spec.batches(rank, world_size, start_step)
    while True:
        produced = False
        for batch in iterator:
            produced = True
            yield batch
        if not produced:
            raise RuntimeError(f"{type(spec).__name__}.batches(rank={rank}) yielded no batch")
        iterator = spec.batches(rank, world_size, start_step)


def _mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over the workers (every rank must pass the same keys)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, values)}


def _gathered(engine, cfg: RunnerConfig):
    """Context in which every parameter is whole (ZeRO-3 partitions them); all ranks enter."""
    if cfg.zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def _save_and_report(engine, cfg: RunnerConfig, rank: int, step: int,
                     history: list[dict[str, float]]) -> None:
    """Every rank saves its DeepSpeed state into its own folder; Ray merges the folders."""
    import ray.train
    from ray.train import Checkpoint
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix=f"raypref-ckpt-{rank}-") as tmp:
        engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG, client_state={"history": history})
        with _gathered(engine, cfg):
            if rank == 0:
                weights = Path(tmp) / WEIGHTS_FILE
                partial = weights.with_suffix(".tmp")
                # copies: ZeRO's flat buffers make tied weights views safetensors refuses
                state = {k: v.detach().to("cpu").clone().contiguous()
                         for k, v in engine.module.state_dict().items()}
                save_file(state, str(partial))
                os.replace(partial, weights)
                (Path(tmp) / HISTORY_FILE).write_text(json.dumps(history))
        ray.train.report({"step": step, **history[-1]},
                         checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:06d}")


def _read_history(checkpoint_dir: Path) -> list[dict[str, float]]:
    path = checkpoint_dir / HISTORY_FILE
    return json.loads(path.read_text()) if path.exists() else []
