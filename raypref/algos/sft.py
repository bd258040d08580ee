"""Supervised fine-tuning loss: next-token cross-entropy on response tokens only."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def response_mask(prompt_lengths: torch.Tensor, lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Bool [B, T]: True at response tokens (after the prompt, before the padding).

    Right padding is assumed: example i occupies positions [0, lengths[i]).
    """
    if (prompt_lengths > lengths).any():
        raise ValueError("response_mask: a prompt length exceeds its example's length")
    positions = torch.arange(seq_len, device=lengths.device).unsqueeze(0)
    return (positions >= prompt_lengths.unsqueeze(1)) & (positions < lengths.unsqueeze(1))


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor,
             target_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting input_ids[t] from position t-1, over the positions t
    where target_mask is True (the response); prompt and padding tokens add nothing.

    logits [B, T, V], input_ids [B, T], target_mask [B, T] bool.
    """
    if logits.shape[:2] != input_ids.shape or input_ids.shape != target_mask.shape:
        raise ValueError(f"sft_loss: shapes differ: logits {tuple(logits.shape)}, "
                         f"input_ids {tuple(input_ids.shape)}, mask {tuple(target_mask.shape)}")
    targets = input_ids[:, 1:]
    mask = target_mask[:, 1:]  # the first token has no prediction
    if not mask.any():
        raise ValueError("sft_loss: no response token in the batch")
    token_losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                   reduction="none")
    return token_losses[mask.flatten()].mean()
