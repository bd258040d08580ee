"""Several roles in one loop: a small actor-critic that generates inside its loop (two trainable
roles with their own DeepSpeed engines, one frozen reference), crashed and resumed on 2 workers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from ray import cloudpickle
from safetensors.torch import load_file

from raypref.train.faults import FaultInjectingSpec
from raypref.train.runner import RunnerConfig, run
from raypref.train.spec import LoopSpec, Role

cloudpickle.register_pickle_by_value(sys.modules[__name__])
VOCAB, PROMPT, NEW, GOOD_TOKEN = 12, 3, 4, 3


class ActorCriticSpec(LoopSpec):
    """Policy-gradient toy: the actor samples NEW tokens after a random prompt, the reward counts
    GOOD_TOKEN in them, the critic learns the reward, a KL term pulls the actor to the frozen
    reference. A rollout is reused for `rollout_every` steps: the buffer is spec state."""

    def __init__(self, log_dir: str, rollout_every: int = 2):
        self.log_dir, self.rollout_every = log_dir, rollout_every
        self._buffer, self._buffer_step = None, 0

    def roles(self):
        return {"actor": Role(lr=3e-2), "critic": Role(lr=1e-2), "reference": Role(trainable=False)}

    def build_model(self, role="actor"):
        if role == "critic":
            return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Flatten(),
                                       torch.nn.Linear(8 * (PROMPT + NEW), 1))
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    @torch.no_grad()
    def _rollout(self, ctx) -> torch.Tensor:
        actor = ctx.models["actor"]
        gen = torch.Generator().manual_seed(1000 * ctx.step + ctx.rank)
        ids = torch.randint(0, VOCAB, (ctx.micro_batch_size, PROMPT), generator=gen)
        for _ in range(NEW):  # sampling from the global RNG: restored on resume or this diverges
            probs = torch.softmax(actor(ids).logits[:, -1], dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1)], dim=1)
        return ids

    def batches(self, ctx):
        with open(Path(self.log_dir) / f"starts_rank{ctx.rank}.txt", "a") as f:
            f.write(f"{ctx.step}\n")
        while True:
            if self._buffer is None or ctx.step - self._buffer_step >= self.rollout_every:
                self._buffer, self._buffer_step = self._rollout(ctx), ctx.step
            yield self._buffer

    def loss(self, batch, ctx):
        reward = (batch[:, PROMPT:] == GOOD_TOKEN).float().sum(dim=1)
        targets = batch[:, PROMPT:].unsqueeze(-1)
        logp = torch.log_softmax(ctx.models["actor"](batch).logits[:, PROMPT - 1:-1], -1)
        logp = logp.gather(-1, targets).squeeze(-1).sum(dim=1)
        with torch.no_grad():
            ref = torch.log_softmax(ctx.models["reference"](batch).logits[:, PROMPT - 1:-1], -1)
            ref = ref.gather(-1, targets).squeeze(-1).sum(dim=1)
        value = ctx.models["critic"](batch).squeeze(-1)
        advantage = (reward - value).detach()
        kl = (logp - ref).mean()
        actor_loss = -(advantage * logp).mean() + 0.1 * kl
        critic_loss = ((value - reward) ** 2).mean()
        return {"actor": actor_loss, "critic": critic_loss}, {"reward": reward.mean().item(), "kl": kl.item()}

    def state_dict(self):
        return {"buffer": self._buffer, "buffer_step": self._buffer_step}

    def load_state_dict(self, state):
        self._buffer, self._buffer_step = state["buffer"], state["buffer_step"]


def _config(tmp_path: Path, name: str) -> RunnerConfig:
    return RunnerConfig(num_workers=2, zero_stage=2, lr=1e-2, warmup_steps=1, max_steps=6,
                        micro_batch_size=8, checkpoint_every=3, max_failures=1, log_every=2,
                        storage_path=str(tmp_path / "runs"), name=name, seed=5)


def _optimizer_moments(checkpoint: Path, role: str) -> list[torch.Tensor]:
    moments = []
    for path in sorted((checkpoint / f"ds-{role}").glob("*optim_states.pt")):
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        for param_state in state["base_optimizer_state"]["state"].values():
            moments += [param_state["exp_avg"], param_state["exp_avg_sq"], torch.tensor(float(param_state["step"]))]
    return moments


@pytest.mark.slow
def test_actor_critic_with_frozen_reference_resumes_exactly_after_a_crash(ray_local, tmp_path):
    ref_log, crash_log = tmp_path / "ref", tmp_path / "crash"
    ref_log.mkdir(), crash_log.mkdir()
    reference = run(ActorCriticSpec(str(ref_log)), _config(tmp_path, "uninterrupted"))
    # rank 1 dies in step 5; the run resumes from the checkpoint of step 3, whose rollout
    # (made at step 3, used again at step 4) comes back from the spec state
    crashing = FaultInjectingSpec(ActorCriticSpec(str(crash_log)), mode="once",
                                  marker=str(tmp_path / "crashed"), at_step=5, rank=1)
    crashed = run(crashing, _config(tmp_path, "crashed"))

    assert (tmp_path / "crashed").exists()
    assert (crash_log / "starts_rank0.txt").read_text().split() == ["1", "4"]
    assert [m["step"] for m in crashed.metrics] == [1, 2, 3, 4, 5, 6]
    for got, want in zip(crashed.metrics, reference.metrics):
        assert got["loss.actor"] == pytest.approx(want["loss.actor"], rel=1e-5, abs=1e-6)
        assert got["loss.critic"] == pytest.approx(want["loss.critic"], rel=1e-5, abs=1e-6)
        assert got["reward"] == want["reward"]

    for role in ("actor", "critic"):
        final = load_file(str(crashed.export_path / role / "model.safetensors"))
        expected = load_file(str(reference.export_path / role / "model.safetensors"))
        assert final.keys() == expected.keys()
        for key in final:
            torch.testing.assert_close(final[key], expected[key], rtol=1e-5, atol=1e-6)
        got, want = _optimizer_moments(crashed.checkpoint_path, role), _optimizer_moments(reference.checkpoint_path, role)
        assert got and len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    # trainable roles are checkpointed, the frozen reference is not
    files = {p.name for p in crashed.checkpoint_path.iterdir()}
    assert {"actor.safetensors", "critic.safetensors", "ds-actor", "ds-critic"} <= files
    assert not any("reference" in name for name in files)
    # the actor learned: its weights moved away from the (frozen) reference it started as
    torch.manual_seed(5)
    initial = ActorCriticSpec(str(ref_log)).build_model("actor").state_dict()
    final_actor = load_file(str(reference.export_path / "actor" / "model.safetensors"))
    assert not torch.allclose(initial["lm_head.weight"], final_actor["lm_head.weight"])
