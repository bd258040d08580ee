"""Per-token log-probabilities of given labels, without a full-vocabulary float32 log-softmax.

``log p(y_t) = logit[y_t] - logsumexp(logits_t)``: gather the label logit, subtract a
logsumexp computed in float32 a few positions at a time. A plain ``log_softmax(logits.float())``
holds ``tokens × vocabulary`` float32 values (and keeps them for backward): 0.5 GB for one
1024-token sequence at a 128k vocabulary. Here forward holds one chunk at a time and saves only
the per-token logsumexp; backward rebuilds the softmax chunk by chunk
(d log p(y) / d logits = onehot(y) - softmax(logits)).
"""
from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2**22  # float32 values per chunk (16 MB): positions per chunk = this // vocabulary


def _chunks(logits: torch.Tensor):
    """(batch row, slice of positions) covering ``logits[B, T, V]``; each block is contiguous in V."""
    batch, length, vocab = logits.shape
    step = max(1, CHUNK_ELEMENTS // vocab)
    for b in range(batch):
        for start in range(0, length, step):
            yield b, slice(start, min(start + step, length))


class _LabelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        for b, span in _chunks(logits):
            lse[b, span] = torch.logsumexp(logits[b, span].float(), dim=-1)
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
        ctx.save_for_backward(logits, labels, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for b, span in _chunks(logits):
            g = grad[b, span].float()
            block = torch.exp(logits[b, span].float() - lse[b, span].unsqueeze(-1)).mul_(-g.unsqueeze(-1))
            block.scatter_add_(-1, labels[b, span].unsqueeze(-1), g.unsqueeze(-1))
            grad_logits[b, span] = block.to(logits.dtype)
        return grad_logits, None


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits.float())`` gathered at ``labels``, as float32 ``[B, T]``.

    ``logits`` ``[B, T, V]`` in any float dtype (bf16 stays bf16 in memory; the arithmetic is
    float32), ``labels`` ``[B, T]`` token ids. For a causal LM pass ``logits[:, :-1]`` and
    ``input_ids[:, 1:]`` (position t predicts token t + 1)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"label_logprobs: logits {tuple(logits.shape)} must be [B, T, V] and labels "
                         f"{tuple(labels.shape)} [B, T]")
    return _LabelLogProbs.apply(logits, labels.long())


def causal_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L-1]``: log-prob of token t + 1 of ``input_ids`` under the logits at position t."""
    return label_logprobs(logits[:, :-1], input_ids[:, 1:])
