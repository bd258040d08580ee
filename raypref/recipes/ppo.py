"""Loop spec: PPO of a LoRA policy against a frozen reward source, with a KL penalty to the SFT policy.

Roles: ``actor`` (SFT + LoRA, trainable), ``critic`` (SFT body + scalar value head, trainable),
``reference`` (the SFT policy, frozen) and ``reward`` (frozen; any module whose
``score(prompts, responses)`` returns one float per response, e.g. `WorldJudgeReward`).

Each PPO iteration samples ``rollout_size`` prompts, generates with the actor, scores the
responses, and builds a rollout buffer (old log-probs, values, KL-penalized rewards, GAE
advantages); then ``ppo_epochs`` passes over it in micro-batches feed the optimizer steps. The
buffer, its read position, the KL controller and the reward moments are the spec's state, so a
resumed run continues inside the same rollout.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from raypref.algos.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    gae,
    kl_penalized_rewards,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from raypref.models.factory import (
    LoraSettings,
    add_lora,
    encode_example,
    generate_ids,
    load_pretrained,
)
from raypref.train.spec import LoopSpec, Role, StepContext

Buffer = dict[str, torch.Tensor]


class WorldJudgeReward(nn.Module):
    """Reward = Σ_a weight_a · judge_a(response) from the simulated world's attribute judges."""

    def __init__(self, weights: dict[str, float], world_seed: int = 0):
        super().__init__()
        from raypref.data.world import ATTRIBUTES, World

        unknown = sorted(set(weights) - set(ATTRIBUTES))
        if not weights or unknown:
            raise ValueError(f"WorldJudgeReward: weights {weights} must name attributes of {ATTRIBUTES}")
        self.weights, self.world = dict(weights), World(seed=world_seed)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        judged = [self.world.judge(r, p) for p, r in zip(prompts, responses)]
        return torch.tensor([sum(w * s[a] for a, w in self.weights.items()) for s in judged])


class ValueModel(nn.Module):
    """A causal LM's body with a scalar head on its last hidden state: one value per position."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.get_input_embeddings().embedding_dim, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
        return self.head(hidden.float()).squeeze(-1)


def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L-1]``: log-prob of token t+1 given the tokens up to t."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def pack(tokenizer, prompts: Sequence[str], responses: Sequence[list[int]], max_length: int) -> Buffer:
    """Right-padded ``[prompt | response]`` rows; ``mask`` ``[B, L-1]`` marks response tokens in the
    shifted (predicted-token) frame used by every per-token tensor."""
    rows, starts = [], []
    for prompt, response in zip(prompts, responses):
        ids, n_prompt = encode_example(tokenizer, prompt, "", max_length)
        ids = (ids[:n_prompt] + list(response))[:max_length]
        if len(ids) <= n_prompt:
            ids = ids + [tokenizer.eos_token_id]  # an empty response still has one token to score
        rows.append(ids)
        starts.append(n_prompt)
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for b, ids in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids)
        attention[b, :len(ids)] = 1
    positions = torch.arange(1, width).unsqueeze(0)
    lengths = attention.sum(dim=1, keepdim=True)
    mask = (positions >= torch.tensor(starts).unsqueeze(1)) & (positions < lengths)
    return {"input_ids": input_ids, "attention_mask": attention, "mask": mask.long()}


@dataclass
class PPOSpec(LoopSpec):
    """PPO on prompts with a frozen reward module built by ``reward_factory()`` (picklable)."""

    sft_dir: str
    prompts: list[str]
    reward_factory: object  # () -> module with score(prompts, responses); e.g. functools.partial(WorldJudgeReward, {...})
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16))
    rollout_size: int = 16  # prompts per PPO iteration (per worker)
    ppo_epochs: int = 2
    max_new_tokens: int = 48
    max_length: int = 128
    temperature: float = 1.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    kl_coef: float = 0.05
    kl_target: float | None = 6.0  # None: fixed coefficient
    kl_horizon: int = 10_000
    normalize_rewards: bool = True  # divide scores by their running std
    critic_lr: float | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("PPOSpec.prompts: no prompts")
        for name in ("rollout_size", "ppo_epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"PPOSpec.{name}={getattr(self, name)}: must be >= 1")
        self._tokenizer = None
        self.kl_ctl = (FixedKLController(self.kl_coef) if self.kl_target is None
                       else AdaptiveKLController(self.kl_coef, self.kl_target, self.kl_horizon))
        self.moments = RunningMoments()
        self.buffer: Buffer | None = None
        self.position = 0  # micro-batches already read from the buffer
        self.rollouts = 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def roles(self) -> dict[str, Role]:
        return {"actor": Role(), "critic": Role(lr=self.critic_lr),
                "reference": Role(trainable=False), "reward": Role(trainable=False)}

    def tokenizer(self):
        if self._tokenizer is None:
            _, self._tokenizer = load_pretrained(self.sft_dir)
        return self._tokenizer

    def build_model(self, role: str = "actor") -> nn.Module:
        if role == "reward":
            return self.reward_factory()
        lm, self._tokenizer = load_pretrained(self.sft_dir)
        if role == "actor":
            return add_lora(lm, self.lora)
        if role == "critic":
            return ValueModel(lm)
        if role == "reference":
            return lm
        raise ValueError(f"PPOSpec: unknown role {role!r}")

    # ----- rollouts ------------------------------------------------------------------------
    @torch.no_grad()
    def make_rollout(self, ctx: StepContext) -> Buffer:
        """Generate, score and turn one batch of prompts into PPO training tensors."""
        actor, critic = ctx.models["actor"], ctx.models["critic"]
        tokenizer = self.tokenizer()
        rng = random.Random(ctx.seed * 1_000_003 + ctx.rank * 7919 + self.rollouts)
        prompts = [self.prompts[rng.randrange(len(self.prompts))] for _ in range(self.rollout_size)]
        responses = generate_ids(actor, tokenizer, prompts, self.max_new_tokens, greedy=False,
                                 temperature=self.temperature, seed=rng.randrange(2**31))
        texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
        scores = ctx.models["reward"].score(prompts, texts).float()
        raw_scores = scores.clone()
        if self.normalize_rewards:
            self.moments.update(scores)
            scores = self.moments.normalize(scores)
        batch = pack(tokenizer, prompts, responses, self.max_length)
        device = ctx.device
        ids, attention, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "mask"))
        was_training = actor.training
        actor.eval()
        old_logprobs = token_logprobs(actor, ids, attention)
        actor.train(was_training)
        ref_logprobs = token_logprobs(ctx.models["reference"], ids, attention)
        values = critic(ids, attention)[:, :-1].float() * mask
        rewards, kl = kl_penalized_rewards(scores.to(device), old_logprobs, ref_logprobs, mask, self.kl_ctl.value)
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        advantages = masked_whiten(advantages, mask)
        kl_per_response = kl.sum(dim=1).mean().item()
        self.kl_ctl.update(kl_per_response, self.rollout_size)
        self.rollouts += 1
        buffer = {"input_ids": ids, "attention_mask": attention, "mask": mask, "old_logprobs": old_logprobs,
                  "old_values": values, "advantages": advantages, "returns": returns}
        buffer = {k: v.detach().cpu() for k, v in buffer.items()}
        buffer["stats"] = torch.tensor([raw_scores.mean().item(), kl_per_response, self.kl_ctl.value])
        return buffer

    def _micro_batches_per_rollout(self, size: int) -> int:
        return self.ppo_epochs * max(1, self.rollout_size // size)

    def batches(self, ctx: StepContext) -> Iterator[Buffer]:
        """Micro-batches of the current rollout (ppo_epochs shuffled passes), then a new rollout."""
        size = ctx.micro_batch_size
        if size > self.rollout_size:
            raise ValueError(f"micro_batch_size={size} exceeds PPOSpec.rollout_size={self.rollout_size}")
        while True:
            if self.buffer is None or self.position >= self._micro_batches_per_rollout(size):
                self.buffer, self.position = self.make_rollout(ctx), 0
            per_epoch = max(1, self.rollout_size // size)
            epoch, offset = divmod(self.position, per_epoch)
            order = torch.randperm(self.rollout_size, generator=torch.Generator().manual_seed(
                ctx.seed * 1_000_003 + self.rollouts * 101 + epoch))
            rows = order[offset * size:(offset + 1) * size]
            self.position += 1
            yield {k: v[rows] if k != "stats" else v for k, v in self.buffer.items()}

    def loss(self, batch: Buffer, ctx: StepContext) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        device = ctx.device
        batch = {k: v.to(device) for k, v in batch.items()}
        ids, attention, mask = batch["input_ids"], batch["attention_mask"], batch["mask"]
        logprobs = token_logprobs(ctx.models["actor"], ids, attention)
        actor_loss, actor_metrics = policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                                self.clip_range)
        values = ctx.models["critic"](ids, attention)[:, :-1].float()
        critic_loss, critic_metrics = value_loss(values, batch["old_values"], batch["returns"], mask,
                                                 self.value_clip_range)
        score, kl, kl_coef = batch["stats"].tolist()
        metrics = {"policy/loss": actor_loss.item(), "value/loss": critic_loss.item(), "reward/score": score,
                   "kl/per_response": kl, "kl/coef": kl_coef,
                   "value/mean": masked_mean(values.detach(), mask).item(), **actor_metrics, **critic_metrics}
        return {"actor": actor_loss, "critic": critic_loss}, metrics

    # ----- resumable state -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "position": self.position, "rollouts": self.rollouts,
                "kl_ctl": self.kl_ctl.state_dict(), "moments": self.moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer, self.position, self.rollouts = state["buffer"], state["position"], state["rollouts"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.moments.load_state_dict(state["moments"])
