"""Fault injection for tests and drills: a spec wrapper whose worker process dies mid-run.

`FaultInjectingSpec` kills the worker with ``os._exit(1)`` (as an OOM kill or a lost node would
look) at a given step, so the real retry path runs: Ray Train restarts the workers and the run
resumes from its latest committed checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from raypref.train.spec import LoopSpec, StepContext

MODES = ("once", "always")


@dataclass
class FaultInjectingSpec(LoopSpec):
    """Wraps a spec so its rank-`rank` worker dies when it reaches step ``at_step``.

    ``once``: only the first attempt dies (a marker file remembers it); ``always``: every one.
    """

    inner: LoopSpec
    mode: str
    marker: str
    at_step: int = 3
    rank: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"FaultInjectingSpec.mode={self.mode!r}: use one of {MODES}")

    def roles(self):
        return self.inner.roles()

    def build_model(self, role="policy"):
        return self.inner.build_model(role)

    def param_groups(self, role, model):
        return self.inner.param_groups(role, model)

    def batches(self, ctx: StepContext):
        return self.inner.batches(ctx)

    def loss(self, batch, ctx: StepContext):
        if ctx.step == self.at_step and ctx.rank == self.rank and \
                (self.mode == "always" or not os.path.exists(self.marker)):
            Path(self.marker).touch()
            os._exit(1)
        return self.inner.loss(batch, ctx)

    def evaluate(self, ctx: StepContext):
        return self.inner.evaluate(ctx)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def fingerprint(self):
        return self.inner.fingerprint()  # injecting a fault does not make it another run

    def export(self, models, out_dir):
        return self.inner.export(models, out_dir)
