"""The chunked per-token log-prob equals log_softmax(float32).gather, values and gradients."""
import pytest
import torch

from raypref.algos import logprob
from raypref.algos.logprob import causal_logprobs, label_logprobs


def reference(logits, labels):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_full_log_softmax_and_its_gradient(dtype, monkeypatch):
    monkeypatch.setattr(logprob, "CHUNK_ELEMENTS", 3 * 50)  # 3 positions per chunk: several chunks per row
    torch.manual_seed(0)
    logits = (torch.randn(2, 7, 50) * 4).to(dtype)
    labels = torch.randint(0, 50, (2, 7))
    weights = torch.randn(2, 7)
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got, want = label_logprobs(ours, labels), reference(theirs, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)  # float32 rounding at |log p| ~ 16
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert ours.grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 gradients are rounded to bf16
    torch.testing.assert_close(ours.grad.float(), theirs.grad.float(), atol=tol, rtol=0)


def test_causal_shift_matches_the_old_dpo_computation():
    torch.manual_seed(1)
    logits, ids = torch.randn(3, 9, 20), torch.randint(0, 20, (3, 9))
    old = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(causal_logprobs(logits, ids), old, atol=1e-6, rtol=0)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="must be"):
        label_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
