"""P-DPO / P-IPO loss and the P-RLHF user models (P-RLHF §4.3-4.4, §F.3)."""

from __future__ import annotations

import pytest
import torch

from raypref.algos.dpo import dpo_loss
from raypref.algos.pdpo import pdpo_loss, response_logprobs
from raypref.models.user_model import PersonalizedLM, UserModel, UserModelConfig

VOCAB, DIM = 20, 16
USERS = ["ann", "bob", "cy"]


def _tiny_lm(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=DIM, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def _plm(kind: str, n_tokens: int = 3, seed: int = 0) -> PersonalizedLM:
    torch.manual_seed(seed + 1)
    users = UserModel(UserModelConfig(kind=kind, n_tokens=n_tokens, n_clusters=2, init_std=0.5), DIM, USERS)
    with torch.no_grad():  # users start equal to the generic user; make them differ
        if kind == "individual":
            users.offsets.normal_(0, 0.5)
        elif kind == "cluster":
            users.weights.normal_(0, 1.0)
    return PersonalizedLM(_tiny_lm(seed), users)


def _batch(seed: int = 0, batch: int = 4, length: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # one right-padded row
    labels = mask.clone()
    labels[:, :3] = 0  # 3 prompt tokens
    return ids, mask, labels


# ---------------------------------------------------------------- the loss

def _logps(seed: int, n: int = 5) -> torch.Tensor:
    return -torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 10


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_alpha_one_equals_dpo_on_the_users_pairs(loss_type):
    uc, ur, gc, gr, rc, rr = (_logps(s) for s in range(6))
    with_generic = pdpo_loss(uc, ur, gc, gr, rc, rr, beta=0.5, alpha=1.0, loss_type=loss_type)
    skipped = pdpo_loss(uc, ur, None, None, rc, rr, beta=0.5, alpha=1.0, loss_type=loss_type)
    plain, c, r = dpo_loss(uc, ur, rc, rr, beta=0.5, loss_type=loss_type)
    assert with_generic.loss.item() == plain.item() == skipped.loss.item()
    assert torch.equal(with_generic.user_chosen_rewards, c) and torch.equal(with_generic.user_rejected_rewards, r)


def test_alpha_mixes_the_user_and_generic_terms():
    uc, ur, gc, gr, rc, rr = (_logps(s) for s in range(6))
    out = pdpo_loss(uc, ur, gc, gr, rc, rr, beta=0.5, alpha=0.3)
    user, _, _ = dpo_loss(uc, ur, rc, rr, 0.5)
    generic, _, _ = dpo_loss(gc, gr, rc, rr, 0.5)
    assert out.loss.item() == pytest.approx(0.3 * user.item() + 0.7 * generic.item(), abs=1e-7)
    assert pdpo_loss(uc, ur, gc, gr, rc, rr, beta=0.5, alpha=0.0).loss.item() == pytest.approx(generic.item())


def test_pipo_matches_hand_computed_ipo():
    """P-IPO term: (log π(y1)/π(y2) − log π_ref(y1)/π_ref(y2) − 1/(2β))², both terms mixed by α."""
    uc, ur, gc, gr, rc, rr = (torch.tensor([v]) for v in (-2.0, -5.0, -3.0, -3.5, -4.0, -4.5))
    beta, alpha = 0.25, 0.6
    user = ((-2.0 + 5.0) - (-4.0 + 4.5) - 1 / (2 * beta)) ** 2  # (3 - 0.5 - 2)^2 = 0.25
    generic = ((-3.0 + 3.5) - 0.5 - 2.0) ** 2  # 4.0
    out = pdpo_loss(uc, ur, gc, gr, rc, rr, beta=beta, alpha=alpha, loss_type="ipo")
    assert out.loss.item() == pytest.approx(alpha * user + (1 - alpha) * generic)


def test_bad_alpha_and_missing_generic_are_refused():
    x = _logps(0)
    with pytest.raises(ValueError, match="alpha"):
        pdpo_loss(x, x, x, x, x, x, beta=0.5, alpha=1.5)
    with pytest.raises(ValueError, match="generic"):
        pdpo_loss(x, x, None, None, x, x, beta=0.5, alpha=0.5)


# ---------------------------------------------------------------- the soft prompt

@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_users_change_logits_only_through_their_tokens(kind):
    plm = _plm(kind)
    ids, mask, _ = _batch()
    valid = mask.bool()
    ann, bob = torch.full((4,), 1), torch.full((4,), 2)
    a1, a2, b = plm(ids, mask, ann), plm(ids, mask, ann), plm(ids, mask, bob)
    assert torch.equal(a1, a2)  # same user, same logits
    assert (a1[valid] - b[valid]).abs().max() > 1e-3  # another user, other logits


def test_no_user_tokens_gives_the_plain_models_logits_exactly():
    plm = _plm("uniform", n_tokens=0)
    ids, mask, _ = _batch()
    plain = plm.lm(input_ids=ids, attention_mask=mask).logits
    ours = plm(ids, mask, torch.zeros(4, dtype=torch.long))
    valid = mask.bool()
    assert torch.equal(ours[valid], plain[valid])


def test_a_row_does_not_depend_on_its_batch_neighbours_text_length():
    """Explicit texts of different lengths are padded inside the prefix: row 0 alone == row 0 in a batch."""
    plm = _plm("individual")
    ids, mask, _ = _batch(batch=2)
    users = torch.tensor([1, 0])
    text = torch.tensor([[3, 4, 0, 0], [5, 6, 7, 8]])
    text_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    together = plm(ids, mask, users, text, text_mask)
    alone = plm(ids[:1], mask[:1], users[:1], text[:1, :2], text_mask[:1, :2])
    assert torch.allclose(together[0], alone[0], atol=1e-5)
    # and the text matters: without it row 0 changes
    assert (plm(ids[:1], mask[:1], users[:1])[0] - alone[0]).abs().max() > 1e-3


def test_unseen_users_map_to_the_generic_embedding():
    um = UserModel(UserModelConfig(kind="individual", n_tokens=2), DIM, USERS)
    assert um.index(["bob", "zed", None, "ann"]).tolist() == [2, 0, 0, 1]
    with torch.no_grad():
        um.offsets.normal_()
    out = um(um.index(["zed", "bob"]))
    assert torch.equal(out[0], um.generic) and torch.equal(out[1], um.generic + um.offsets[1])
    with pytest.raises(ValueError, match="outside 0..3"):
        um(torch.tensor([4]))


# ---------------------------------------------------------------- gradients of the user model

def _pdpo_on(plm: PersonalizedLM, users: torch.Tensor, alpha: float) -> torch.Tensor:
    ids, mask, labels = _batch(batch=4)
    n = 2  # rows 0-1 chosen, rows 2-3 rejected, both by `users`
    both = torch.cat([users, users])
    logps = response_logprobs(plm(ids, mask, both), ids, labels)
    generic = response_logprobs(plm(ids, mask, torch.zeros_like(both)), ids, labels)
    with plm.reference() as ref:
        ref_logps = response_logprobs(ref(input_ids=ids, attention_mask=mask).logits, ids, labels)
    return pdpo_loss(logps[:n], logps[n:], generic[:n], generic[n:], ref_logps[:n], ref_logps[n:],
                     beta=0.5, alpha=alpha).loss


def test_individual_gradients_follow_e0_plus_offset():
    """e_i = e_0 + o_i, so: users absent from the batch get zero gradient on o_i; with α = 1,
    ∂L/∂e_0 = Σ_i ∂L/∂o_i over the batch's users (e_0 learns only through their paths); with
    α = 0 no offset gets any gradient (the generic term sees e_0 alone)."""
    plm = _plm("individual")
    um = plm.user_model
    _pdpo_on(plm, torch.tensor([1, 3]), alpha=1.0).backward()
    assert torch.count_nonzero(um.offsets.grad[1]) == 0  # bob (id 2) is not in the batch
    assert um.offsets.grad[0].abs().sum() > 0 and um.offsets.grad[2].abs().sum() > 0
    assert torch.allclose(um.generic.grad, um.offsets.grad.sum(dim=0), atol=1e-7)

    um.zero_grad()
    _pdpo_on(plm, torch.tensor([1, 3]), alpha=0.0).backward()
    assert torch.count_nonzero(um.offsets.grad) == 0
    assert um.generic.grad.abs().sum() > 0


def test_cluster_gradients_reach_only_the_batch_users_weights():
    plm = _plm("cluster")
    um = plm.user_model
    _pdpo_on(plm, torch.tensor([1, 1]), alpha=0.5).backward()
    rows_with_grad = (um.weights.grad.abs().sum(dim=1) > 0).nonzero().flatten().tolist()
    assert rows_with_grad == [0, 1]  # the generic row (user-agnostic term) and ann's row
    um.zero_grad()
    _pdpo_on(plm, torch.tensor([1, 1]), alpha=0.0).backward()
    assert (um.weights.grad.abs().sum(dim=1) > 0).nonzero().flatten().tolist() == [0]


def test_reference_sees_no_user_tokens_and_no_adapter():
    from peft import LoraConfig, get_peft_model

    lm = _tiny_lm()
    base_logits = lm(input_ids=_batch()[0]).logits
    peft_lm = get_peft_model(lm, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                            init_lora_weights=False))
    plm = PersonalizedLM(peft_lm, UserModel(UserModelConfig(n_tokens=2), DIM, USERS))
    ids = _batch()[0]
    assert (plm(ids, torch.ones_like(ids), torch.full((4,), 1)) - base_logits).abs().max() > 1e-3
    with plm.reference() as ref:
        assert torch.allclose(ref(input_ids=ids).logits, base_logits, atol=1e-6)


def test_save_and_load_round_trip(tmp_path):
    for kind in ("uniform", "individual", "cluster"):
        um = UserModel(UserModelConfig(kind=kind, n_tokens=2, n_clusters=3), DIM, USERS)
        um.save(tmp_path / kind)
        back = UserModel.load(tmp_path / kind)
        ids = torch.tensor([0, 1, 2, 3])
        assert back.users == USERS and torch.equal(back(ids), um(ids))
    with pytest.raises(FileNotFoundError, match="user_model"):
        UserModel.load(tmp_path / "missing")


# ---------------------------------------------------------------- generation

def _greedy_by_full_forward(plm, prompt, user, text, steps):
    """Reference decoder: the whole sequence through PersonalizedLM.forward at every step."""
    ids = list(prompt)
    text_ids = torch.tensor([text]) if text else None
    for _ in range(steps):
        x = torch.tensor([ids])
        logits = plm(x, torch.ones_like(x), torch.tensor([user]), text_ids)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_generation_for_seen_unseen_and_unseen_with_text_matches_the_forward():
    plm = _plm("individual")
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    texts = [[], [12, 13], [14]]
    users = torch.tensor([1, 0, 0])  # seen user, unseen user, unseen user with text
    out = plm.generate(prompts, users, texts=texts, max_new_tokens=5)
    for prompt, user, text, new in zip(prompts, users.tolist(), texts, out):
        assert new == _greedy_by_full_forward(plm, prompt, user, text, 5)
    # an unseen user generates what the generic user does; a seen user may differ
    unseen = plm.generate([[3, 4, 5]], plm.user_model.index(["nobody"]), max_new_tokens=5)
    assert unseen == plm.generate([[3, 4, 5]], torch.tensor([0]), max_new_tokens=5)


def test_generation_stops_at_eos():
    plm = _plm("individual")
    free = plm.generate([[3, 4, 5]], torch.tensor([2]), max_new_tokens=6)[0]
    eos = free[2]
    cut = plm.generate([[3, 4, 5]], torch.tensor([2]), max_new_tokens=6, eos_token_id=eos)[0]
    assert cut == free[: free.index(eos) + 1]
