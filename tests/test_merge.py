"""Soup merging: the exact LoRA soup equals the weighted sum of the materialized policies."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from raypref.models.merge import (
    MERGE_METHODS,
    METHODS,
    LoraAdapter,
    MergeError,
    check_method,
    merge,
    merge_full,
    merge_lora_exact,
    merge_lora_factors_separately,
    merge_lora_into,
    soup_model,
    validate_weights,
)


def _base():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=24, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()  # tied wte / lm_head


def _policy(base, seed: int, **lora_kwargs):
    """A LoRA policy with random (non-zero) A and B, so every adapter changes the model."""
    cfg = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], **lora_kwargs})
    model = get_peft_model(copy.deepcopy(base), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _materialized(peft_model):
    return {k: v.clone() for k, v in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()}


def _assert_states_close(a, b, atol=1e-5):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-5), f"{k}: max diff {(a[k] - b[k]).abs().max()}"


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def soup():
    base = _base()
    policies = {
        "P1A": _policy(base, 1),
        "P2B": _policy(base, 2, r=2, lora_alpha=4, target_modules=["c_attn"], use_rslora=True),
        "P3A": _policy(base, 3, target_modules=["c_attn", "c_proj", "wte"]),  # embedding, tied to lm_head
        "P1B": _policy(base, 4),  # same layout as P1A (needed by the factor-wise variant)
    }
    adapters = {n: LoraAdapter.from_peft_model(m) for n, m in policies.items()}
    full = {n: _materialized(m) for n, m in policies.items()}
    return base, adapters, full


def test_exact_soup_equals_weighted_sum_of_materialized_policies(soup):
    base, adapters, full = soup
    weights = {"P1A": 0.2, "P2B": 0.5, "P3A": 0.3}
    expected = {k: sum(w * full[n][k] for n, w in weights.items()) for k in full["P1A"]}
    got = merge_lora_exact(base.state_dict(), adapters, weights)
    _assert_states_close(got, expected)
    assert _max_diff(got, base.state_dict()) > 1e-2  # the soup really moved the base
    # Tied weights stay consistent: lm_head follows the LoRA-updated embedding.
    assert torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])


def test_exact_soup_is_the_soup_of_outputs_behaviour(soup):
    """Loaded into a model, the merged weights reproduce the materialized soup's logits."""
    base, adapters, full = soup
    weights = {"P1A": 0.6, "P1B": 0.4}
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    model, ref = copy.deepcopy(base), copy.deepcopy(base)
    model.load_state_dict(merge(method="exact_lora", weights=weights, base=base, adapters=adapters))
    ref.load_state_dict(merge(method="full", weights=weights, full_models={n: full[n] for n in weights}))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_identical_policies_merge_to_that_policy(soup):
    base, adapters, full = soup
    twins = {"a": adapters["P3A"], "b": adapters["P3A"]}
    _assert_states_close(merge_lora_exact(base, twins, {"a": 0.35, "b": 0.65}), full["P3A"])
    _assert_states_close(merge_full({"a": full["P3A"], "b": full["P3A"]}, {"a": 0.35, "b": 0.65}), full["P3A"])


@pytest.mark.parametrize("name", ["P1A", "P2B", "P3A"])
def test_one_hot_weights_return_that_policy(soup, name):
    base, adapters, full = soup
    one_hot = {n: float(n == name) for n in adapters}
    _assert_states_close(merge_lora_exact(base, adapters, one_hot), full[name])
    merged_full = merge_full(full, one_hot)
    assert all(torch.equal(merged_full[k], full[name][k]) for k in full[name])


def test_adapter_dir_roundtrip_matches_in_memory(soup, tmp_path):
    base, adapters, _ = soup
    model = _policy(base, 7, r=2, lora_alpha=16, alpha_pattern={"c_proj": 4})
    model.save_pretrained(tmp_path / "p")
    weights = {"mem": 1.0}
    from_dir = merge_lora_exact(base, {"mem": str(tmp_path / "p")}, weights)
    _assert_states_close(from_dir, _materialized(model))


def test_factor_wise_average_differs_from_exact_soup(soup):
    base, adapters, full = soup
    weights = {"P1A": 0.5, "P1B": 0.5}
    exact = merge_lora_exact(base, adapters, weights)
    factor_wise = merge_lora_factors_separately(base, adapters, weights)
    assert _max_diff(exact, factor_wise) > 1e-2
    # ... but with one-hot weights there is no cross term, so both give the policy.
    _assert_states_close(merge_lora_factors_separately(base, adapters, {"P1A": 1.0, "P1B": 0.0}), full["P1A"])


def test_factor_wise_soup_is_the_product_of_the_averaged_factors(soup):
    """(Σ wᵢ Bᵢ)(Σ wᵢ Aᵢ)·scaling computed by hand from the peft parameters, per target module."""
    base, adapters, _ = soup
    weights = {"P1A": 0.3, "P1B": 0.7}
    peft_models = {"P1A": _policy(base, 1), "P1B": _policy(base, 4)}  # the fixture's two policies
    got = merge_lora_factors_separately(base, adapters, weights)
    params = {n: dict(m.named_parameters()) for n, m in peft_models.items()}
    base_state = base.state_dict()
    targets = [k[len("base_model.model."):-len(".lora_A.default.weight")]
               for k in params["P1A"] if k.endswith("lora_A.default.weight")]
    assert len(targets) == 6  # c_attn, attn.c_proj and mlp.c_proj in two layers
    for module in targets:
        a = sum(w * params[n][f"base_model.model.{module}.lora_A.default.weight"] for n, w in weights.items())
        b = sum(w * params[n][f"base_model.model.{module}.lora_B.default.weight"] for n, w in weights.items())
        delta = (b @ a).T * (8 / 4)  # GPT-2's Conv1D stores W as [in, out]; scaling = alpha / r
        torch.testing.assert_close(got[f"{module}.weight"], base_state[f"{module}.weight"] + delta.detach(),
                                   atol=1e-5, rtol=1e-5)
    untouched = [k for k in base_state if not any(k.startswith(t) for t in targets)]
    assert all(torch.equal(got[k], base_state[k]) for k in untouched)


def test_factor_wise_rejects_different_layouts(soup):
    base, adapters, _ = soup
    with pytest.raises(MergeError, match="identical LoRA targets"):
        merge_lora_factors_separately(base, adapters, {"P1A": 0.5, "P2B": 0.5})


def test_merged_state_saves_as_safetensors_and_reloads(soup, tmp_path):
    from safetensors.torch import load_file, save_file

    base, adapters, _ = soup
    merged = merge_lora_exact(base, adapters, {"P3A": 0.5, "P1A": 0.5})
    save_file(merged, str(tmp_path / "model.safetensors"))  # raises if tensors were shared
    reloaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(reloaded[k], merged[k]) for k in merged)


def test_peft_ties_with_one_policy_and_full_density_is_that_policy(soup):
    base, adapters, full = soup
    got = merge(method="ties", weights={"P1A": 1.0}, base=base, adapters=adapters, density=1.0)
    _assert_states_close(got, full["P1A"])
    dare = merge(method="dare_linear", weights={"P1A": 0.5, "P1B": 0.5}, base=base, adapters=adapters, density=0.5)
    assert _max_diff(dare, base.state_dict()) > 1e-3  # a real, different model came out


@pytest.mark.parametrize(
    "weights, message",
    [
        ({}, "no merge weights"),
        ({"P9Z": 1.0}, r"unknown policy names.*P9Z.*known"),
        ({"P1A": 1.5, "P2B": -0.5}, ">= 0"),
        ({"P1A": float("nan")}, ">= 0"),
        ({"P1A": 0.5, "P2B": 0.4}, "sum to 1.*0.9"),
    ],
)
def test_validate_weights_errors(weights, message):
    with pytest.raises(MergeError, match=message):
        validate_weights(weights, ["P1A", "P2B"])


def test_validate_weights_tolerance_and_missing_names():
    assert validate_weights({"P1A": 0.3, "P2B": 0.7 + 5e-7}, ["P1A", "P2B", "P3A"]) == {"P1A": 0.3, "P2B": 0.7 + 5e-7}


def test_merge_entry_point_errors(soup):
    base, adapters, _ = soup
    with pytest.raises(MergeError, match="unknown merge method"):
        merge(method="svd", weights={"P1A": 1.0}, base=base, adapters=adapters)
    with pytest.raises(MergeError, match="density"):
        merge(method="dare_ties", weights={"P1A": 1.0}, base=base, adapters=adapters)
    with pytest.raises(MergeError, match="nn.Module"):
        merge(method="ties", weights={"P1A": 1.0}, base=base.state_dict(), adapters=adapters, density=0.5)
    with pytest.raises(MergeError, match="PeftModel"):
        merge_lora_exact(_policy(base, 9).state_dict(), adapters, {"P1A": 1.0})


def test_non_low_rank_adapters_are_refused(soup):
    base, adapters, _ = soup
    dora = LoraAdapter(adapters["P1A"].tensors, LoraConfig(r=4, lora_alpha=8, use_dora=True))
    with pytest.raises(MergeError, match="use_dora"):
        merge_lora_exact(base, {"d": dora}, {"d": 1.0})


# ---------------------------------------------------------------- exact merge on other layouts

def _random_lora(model, cfg, seed):
    """``get_peft_model`` on a copy of ``model`` with random, non-zero LoRA factors."""
    peft_model = get_peft_model(copy.deepcopy(model), copy.deepcopy(cfg))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return peft_model


def _check_exact_soup(base, policies, weights):
    """merge_lora_exact(base module) == Σ w · merge_and_unload(policy), key by key, to 1e-5."""
    adapters = {n: LoraAdapter.from_peft_model(m) for n, m in policies.items()}
    full = {n: _materialized(m) for n, m in policies.items()}
    expected = {k: sum(w * full[n][k] for n, w in weights.items()) for k in full[next(iter(full))]}
    got = merge_lora_exact(base, adapters, weights)
    _assert_states_close(got, expected)
    assert _max_diff(got, base.state_dict()) > 1e-2
    return got, adapters


def _llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=100, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_exact_soup_on_llama_linear_projections_and_embeddings(tied):
    base = _llama(tied)
    assert (base.lm_head.weight is base.model.embed_tokens.weight) == tied
    attn = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with_emb = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"])
    policies = {"a": _random_lora(base, attn, 1), "b": _random_lora(base, with_emb, 2)}
    got, adapters = _check_exact_soup(base, policies, {"a": 0.3, "b": 0.7})
    if tied:  # the embedding update reached the tied output head (as merge_and_unload does)
        assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    else:
        assert torch.equal(got["lm_head.weight"], base.lm_head.weight)
    # written into a model's own parameters, the tie survives and the logits are the soup's
    model = merge_lora_into(_llama(tied), base, adapters, {"a": 0.3, "b": 0.7})
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ref = copy.deepcopy(base)
    ref.load_state_dict(got)
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


class _Mixed(torch.nn.Module):
    """Embedding -> GPT-2 Conv1D (weight stored (in, out)) -> Linear: square weights of both kinds."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb = torch.nn.Embedding(20, 12)
        self.conv = Conv1D(12, 12)  # (nf=out, nx=in)
        self.lin = torch.nn.Linear(12, 12)
        self.head = torch.nn.Linear(12, 20)

    def forward(self, ids):
        return self.head(self.lin(torch.tanh(self.conv(self.emb(ids)))))


def test_exact_soup_on_a_model_mixing_conv1d_and_linear_targets():
    torch.manual_seed(0)
    base = _Mixed().eval()
    # one adapter-wide fan_in_fan_out flag cannot be right for both square modules
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["conv", "lin", "emb", "head"], fan_in_fan_out=True)
    policies = {"a": _random_lora(base, cfg, 1), "b": _random_lora(base, cfg, 2)}
    got, adapters = _check_exact_soup(base, policies, {"a": 0.5, "b": 0.5})
    # from the state dict alone, the square modules fall back on the adapter flag: one goes wrong
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        flagged = merge_lora_exact(base.state_dict(), adapters, {"a": 0.5, "b": 0.5})
    assert _max_diff(flagged, got) > 1e-3


def test_tied_embedding_adapter_survives_the_module_path_but_not_a_clone(soup):
    """The GPT-2 tie is only visible in the module's own tensors (what Souper must pass)."""
    base, adapters, full = soup
    one_hot = {n: float(n == "P3A") for n in adapters}
    from_module = merge_lora_exact(base, adapters, one_hot)
    _assert_states_close(from_module, full["P3A"])
    cloned = {k: v.clone() for k, v in base.state_dict().items()}
    from_clone = merge_lora_exact(cloned, adapters, one_hot)
    assert not torch.equal(from_clone["lm_head.weight"], full["P3A"]["lm_head.weight"])


def test_merge_into_preallocated_output_reuses_it(soup):
    base, adapters, _ = soup
    weights = {"P1A": 0.25, "P3A": 0.75}
    target = copy.deepcopy(base)
    ptrs = {k: v.data_ptr() for k, v in target.state_dict().items()}
    merge_lora_into(target, base, adapters, weights)
    assert {k: v.data_ptr() for k, v in target.state_dict().items()} == ptrs
    assert target.lm_head.weight is target.transformer.wte.weight
    _assert_states_close(target.state_dict(), merge_lora_exact(base, adapters, weights))


def test_registry_is_the_one_list_of_methods():
    assert set(METHODS) == set(MERGE_METHODS) >= {"exact_lora", "lora_factors_linear", "full", "ties"}
    check_method("exact_lora")
    with pytest.raises(MergeError, match="unknown merge method 'svd'"):
        check_method("svd")
    with pytest.raises(MergeError, match="density"):
        check_method("dare_linear", 0.0)


@pytest.mark.parametrize("method", ["exact_lora", "lora_factors_linear"])
def test_soup_model_keeps_ties_and_equals_peft(soup, method):
    """What the soups job's Souper should call: with an adapter on GPT-2's wte, lm_head follows."""
    base, adapters, full = soup
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = soup_model(method, base, {"P3A": 1.0}, adapters={"P3A": adapters["P3A"]})
    assert model.lm_head.weight is model.transformer.wte.weight
    _assert_states_close(model.state_dict(), full["P3A"])
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # base untouched


@pytest.mark.parametrize("rows", [1, 127, 128, 300])
@pytest.mark.parametrize("in_place", [False, True])
def test_row_blocked_low_rank_add_equals_addmm(rows, in_place):
    """The merge writes ``base + X @ Y`` a block of rows at a time; every row, the last partial
    block included, must match one whole ``addmm`` (in place on the base too)."""
    from raypref.models.merge import _ROW_BLOCK, _addmm_by_row_blocks

    assert 300 > 2 * _ROW_BLOCK  # so 300 rows span two full blocks and a partial one
    gen = torch.Generator().manual_seed(rows)
    src = torch.randn(rows, 40, generator=gen)
    x, y = torch.randn(rows, 6, generator=gen), torch.randn(6, 40, generator=gen)
    expected, before = torch.addmm(src, x, y), src.clone()
    dst = src if in_place else torch.full_like(src, float("nan"))
    _addmm_by_row_blocks(src, x, y, dst)
    torch.testing.assert_close(dst, expected, rtol=1e-6, atol=1e-6)
    if not in_place:
        assert torch.equal(src, before)  # the base is untouched


def test_row_blocked_low_rank_add_handles_non_contiguous_output():
    from raypref.models.merge import _addmm_by_row_blocks

    src = torch.randn(200, 30)
    x, y = torch.randn(200, 4), torch.randn(4, 30)
    dst = torch.zeros(30, 200).t()  # a transposed view: not contiguous
    _addmm_by_row_blocks(src, x, y, dst)
    torch.testing.assert_close(dst, torch.addmm(src, x, y))
