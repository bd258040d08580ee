"""Personalized DPO / IPO (P-RLHF §4.4 and §F.3), pure torch.

P-DPO mixes two preference losses over the same pairs:

    α · ℓ(π_p(·|x, u^t, u^p), π_ref(·|x))  +  (1 − α) · ℓ(π_p(·|x, u^t, u_0^p), π_ref(·|x))

the first with the annotator's user id, the second with every id replaced by the generic id 0.
The reference is the SFT model without any user tokens, so both terms share one reference
pass. ``ℓ`` is DPO (``sigmoid``) or IPO (``ipo``); with ``ipo`` this is P-IPO (§F.3). §F.3 prints
IPO's log-ratio as a quotient of logs; we read it as IPO's
``(log π(y1)/π(y2) − log π_ref(y1)/π_ref(y2) − 1/(2β))²``, which is what ``algos.dpo`` computes.

The log-probabilities come in as tensors, so this file knows nothing about how the user
embedding reached the model (``models.user_model`` does the soft prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raypref.algos.dpo import (  # same package: pure torch
    dpo_loss,
    implicit_reward_accuracy,
)
from raypref.algos.logprob import causal_logprobs


@dataclass
class PDPOOutput:
    loss: torch.Tensor
    user_loss: torch.Tensor
    generic_loss: torch.Tensor | None  # None when alpha == 1 and the generic pass was skipped
    user_chosen_rewards: torch.Tensor  # beta * (log π_p(y|x,u) − log π_ref(y|x)), detached
    user_rejected_rewards: torch.Tensor
    generic_chosen_rewards: torch.Tensor | None
    generic_rejected_rewards: torch.Tensor | None

    def metrics(self) -> dict[str, float]:
        out = {"loss_user": self.user_loss.item(),
               "reward_accuracy": implicit_reward_accuracy(self.user_chosen_rewards, self.user_rejected_rewards),
               "reward_margin": (self.user_chosen_rewards - self.user_rejected_rewards).mean().item()}
        if self.generic_loss is not None:
            out["loss_generic"] = self.generic_loss.item()
            out["reward_accuracy_generic"] = implicit_reward_accuracy(
                self.generic_chosen_rewards, self.generic_rejected_rewards)
        return out


def pdpo_loss(
    user_chosen_logps: torch.Tensor,
    user_rejected_logps: torch.Tensor,
    generic_chosen_logps: torch.Tensor | None,
    generic_rejected_logps: torch.Tensor | None,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    alpha: float,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> PDPOOutput:
    """P-DPO (``loss_type="sigmoid"``) or P-IPO (``"ipo"``) averaged over the batch.

    ``user_*`` are summed response log-probs under the user's own embedding, ``generic_*``
    under the generic user 0 (may be None only when ``alpha == 1``: the generic term then has
    weight 0 and its forward pass can be skipped). Lengths are used by ``ipo`` as in ``algos.dpo``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if (generic_chosen_logps is None) != (generic_rejected_logps is None):
        raise ValueError("pass both generic_chosen_logps and generic_rejected_logps, or neither")
    if generic_chosen_logps is None and alpha != 1.0:
        raise ValueError(f"alpha={alpha} < 1 needs the generic-user log-probs (the user-0 term has weight {1 - alpha})")
    lengths = dict(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    user_loss, uc, ur = dpo_loss(user_chosen_logps, user_rejected_logps, ref_chosen_logps,
                                 ref_rejected_logps, beta, loss_type, **lengths)
    if generic_chosen_logps is None:
        return PDPOOutput(user_loss, user_loss, None, uc, ur, None, None)
    generic_loss, gc, gr = dpo_loss(generic_chosen_logps, generic_rejected_logps, ref_chosen_logps,
                                    ref_rejected_logps, beta, loss_type, **lengths)
    loss = alpha * user_loss + (1.0 - alpha) * generic_loss
    return PDPOOutput(loss, user_loss, generic_loss, uc, ur, gc, gr)


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, labels_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of the response tokens (``labels_mask == 1``) given logits aligned with
    ``input_ids`` (``logits[:, t]`` predicts token ``t + 1``). Float32 ``[batch]``."""
    if logits.shape[:2] != input_ids.shape or input_ids.shape != labels_mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)} and labels_mask "
                         f"{tuple(labels_mask.shape)} disagree on [batch, length]")
    token_logps = causal_logprobs(logits, input_ids)
    return (token_logps * labels_mask[:, 1:].to(token_logps.dtype)).sum(dim=-1)
