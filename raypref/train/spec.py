"""The loop interface every method implements; `train.runner.run` drives it on N workers.

A method describes *what* to train with a `LoopSpec`; the runner owns *how*: workers,
DeepSpeed engines, batch size and accumulation, learning-rate schedules, checkpoints, resume,
metrics. A spec declares named roles (default: one trainable "policy"):

- trainable roles each get a DeepSpeed engine (optimizer, schedule, ZeRO) and are checkpointed;
- frozen roles (a reference policy, a reward model) are built on every worker, kept in eval
  mode without gradients, and never written into checkpoints.

The runner hands every hook a `StepContext`: which step, which worker, the batch settings and
the role models, so `batches` can generate with a model and `loss` can know the step. A spec's
own resumable state (a sampler position, a rollout buffer, a KL controller) goes through
`state_dict` / `load_state_dict`, saved per worker in every checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

PRIMARY_ROLE = "policy"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Role:
    """One model of a loop. ``lr`` / ``weight_decay``: None = the runner's."""

    trainable: bool = True
    lr: float | None = None
    weight_decay: float | None = None


@dataclass
class StepContext:
    """Where the loop stands, as seen by one worker. The runner updates ``step`` before each
    optimizer step; ``models`` maps role -> module (a trainable role's DeepSpeed module)."""

    step: int  # the optimizer step being taken, 1..max_steps (in `batches`: the first one to feed)
    max_steps: int
    rank: int
    world_size: int
    micro_batch_size: int  # per worker
    grad_accum: int
    seed: int
    models: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False)

    @property
    def model(self) -> torch.nn.Module:
        """The first trainable role's model (the only one in a single-model loop)."""
        return next(iter(self.models.values()))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def micro_batches_done(self) -> int:
        """Micro-batches this worker consumed before the current step."""
        return (self.step - 1) * self.grad_accum


class LoopSpec:
    """What to train. Subclass it; instances are pickled to every worker, so keep them small
    (load data and models inside the hooks, on the worker)."""

    def roles(self) -> dict[str, Role]:
        """Named models of the loop, trainable roles first. Default: one trainable policy."""
        return {PRIMARY_ROLE: Role()}

    def build_model(self, role: str = PRIMARY_ROLE) -> torch.nn.Module:
        """Build the model of ``role``; called on every worker after seeding torch."""
        raise NotImplementedError

    def param_groups(self, role: str, model: torch.nn.Module) -> list[dict]:
        """Optimizer parameter groups of a trainable role. A group may set its own ``lr``
        (its peak rate: the warm-up / decay schedule scales every group alike) and
        ``weight_decay``. Default: every parameter with requires_grad, in one group."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def batches(self, ctx: StepContext) -> Iterator[Any]:
        """This worker's micro-batches, starting with the first one of step ``ctx.step``
        (> 1 after a resume). Each optimizer step takes ``ctx.grad_accum`` of them. When the
        iterator runs out the runner calls ``batches`` again (the next epoch). ``ctx.models``
        is available, e.g. to generate rollouts; ``ctx.step`` moves on as training goes."""
        raise NotImplementedError

    def loss(self, batch: Any, ctx: StepContext) -> tuple[torch.Tensor | dict[str, torch.Tensor],
                                                          dict[str, float]]:
        """Loss of one micro-batch and scalar metrics (the same keys on every worker).
        With several trainable roles, return ``{role: loss}`` holding every trainable role."""
        raise NotImplementedError

    def evaluate(self, ctx: StepContext) -> dict[str, float]:
        """Metrics every ``eval_every`` steps (on every worker; the runner averages them and
        reports them to Ray at once, without waiting for a checkpoint). Default: none."""
        return {}

    def state_dict(self) -> dict:
        """The spec's own resumable state on this worker (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (called on resume, before ``batches``)."""

    def fingerprint(self) -> dict:
        """What makes a run of this spec a different run (config, data, base model). A resumed
        run must have the same fingerprint. Default: a digest of every dataclass field."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if not _left_out(self, f)} if dataclasses.is_dataclass(self) else {}
        return {"spec": f"{type(self).__module__}.{type(self).__qualname__}",
                **{name: digest(value) for name, value in fields.items()}}

    def export(self, models: dict[str, torch.nn.Module], out_dir: Path) -> None:
        """Write the trained models to out_dir (rank 0; parameters already gathered). Default:
        one trainable role into out_dir, several into out_dir/<role>; `save_pretrained`
        where the model has it, else its state dict as safetensors."""
        trainable = [r for r, role in self.roles().items() if role.trainable]
        for name in trainable:
            target = Path(out_dir) if len(trainable) == 1 else Path(out_dir) / name
            target.mkdir(parents=True, exist_ok=True)
            save_module(models[name], target)


def save_module(model: torch.nn.Module, out_dir: Path) -> None:
    """``save_pretrained`` (safetensors) where the model has it, else ``model.safetensors``."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out_dir, safe_serialization=True)
        return
    from safetensors.torch import save_file

    # copies: tied or ZeRO-flattened parameters are views safetensors refuses to write
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(out_dir) / WEIGHTS_FILE))


def _left_out(obj, f: dataclasses.Field) -> bool:
    """A field added later (metadata ``digest_unless_default``) at its default: runs made before
    it existed keep their fingerprints and still resume."""
    return bool(f.metadata.get("digest_unless_default")) and getattr(obj, f.name) == f.default


def digest(value: Any) -> str:
    """A stable short hash of a config value, data list, tensor or path (for fingerprints)."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()[:16]


def _feed(h, value: Any) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        h.update(type(value).__qualname__.encode())
        for f in dataclasses.fields(value):
            if _left_out(value, f):
                continue
            h.update(f.name.encode())
            _feed(h, getattr(value, f.name))
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            h.update(str(key).encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"[{len(value)}".encode())
        for item in value:
            _feed(h, item)
    elif isinstance(value, torch.Tensor):
        h.update(str((value.dtype, tuple(value.shape))).encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    else:
        h.update(json.dumps(value, default=str).encode())
