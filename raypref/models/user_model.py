"""P-RLHF user models and the soft prompt that carries them into a causal LM (P-RLHF §4.2-4.4).

A user is (optional text u^t, id u^p). Seen users have ids 1..m; id 0 is the generic user,
which is also what any unseen user gets. The implicit user model maps an id to ``T_u`` token
embeddings:

* ``uniform``    every id -> the same e (may have T_u = 0: plain vanilla DPO)
* ``individual`` id 0 -> e_0, id i -> e_0 + o_i (offsets start at 0: every user starts generic)
* ``cluster``    id i -> Σ_k W[i, k] · V[k] with K cluster centres V and one weight row per id
                 (row 0 is the generic user's)

The explicit part is the LM's own input embeddings of u^t. The prefix concat(implicit, explicit)
goes in front of the input's token embeddings (positions are then counted over the whole
sequence); shorter texts are padded on the left of the prefix and masked, with position ids
taken from the mask so a row's logits do not depend on its neighbours in the batch.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

USER_MODEL_KINDS = ("uniform", "individual", "cluster")
GENERIC_USER = 0
WEIGHTS_FILE = "user_model.safetensors"
CONFIG_FILE = "user_model.json"


@dataclass
class UserModelConfig:
    kind: str = "individual"  # one of USER_MODEL_KINDS
    n_tokens: int = 10  # T_u, user tokens in the soft prompt (paper: 10)
    n_clusters: int = 5  # K, for kind="cluster" (paper: 5)
    init_std: float = 0.02  # std of the random initial embeddings (e, e_0, V)

    def validate(self) -> None:
        if self.kind not in USER_MODEL_KINDS:
            raise ValueError(f"UserModelConfig.kind={self.kind!r}: must be one of {USER_MODEL_KINDS}")
        if self.n_tokens < 0 or (self.kind != "uniform" and self.n_tokens < 1):
            raise ValueError(f"UserModelConfig.n_tokens={self.n_tokens}: must be >= 1 "
                             f"(>= 0 for kind='uniform')")
        if self.kind == "cluster" and self.n_clusters < 1:
            raise ValueError(f"UserModelConfig.n_clusters={self.n_clusters}: must be >= 1")
        if self.init_std <= 0:
            raise ValueError(f"UserModelConfig.init_std={self.init_std}: must be > 0")


class UserModel(nn.Module):
    """Implicit user model f_p^im: user ids ``[B]`` -> embeddings ``[B, T_u, d]``.

    ``users`` are the seen users' own ids or names, in order (``users[i-1]`` gets index i);
    ``index`` turns them into indices, mapping any user it has not seen (or None) to the generic 0.
    """

    def __init__(self, cfg: UserModelConfig, embed_dim: int, users: Sequence[int | str]):
        super().__init__()
        cfg.validate()
        if len(set(users)) != len(users):
            raise ValueError("UserModel: duplicate users")
        if GENERIC_USER in users:
            raise ValueError("UserModel: user 0 is the generic (unknown) user and cannot be a seen user")
        self.cfg, self.embed_dim, self.users = cfg, embed_dim, list(users)
        self._ids = {name: i + 1 for i, name in enumerate(self.users)}
        shape = (cfg.n_tokens, embed_dim)
        m = len(self.users)
        if cfg.kind == "uniform" and cfg.n_tokens == 0:  # vanilla DPO: no user tokens, no parameter
            self.register_buffer("shared", torch.zeros(shape))
        elif cfg.kind == "uniform":
            self.shared = nn.Parameter(torch.randn(shape) * cfg.init_std)
        elif cfg.kind == "individual":
            self.generic = nn.Parameter(torch.randn(shape) * cfg.init_std)  # e_0
            self.offsets = nn.Parameter(torch.zeros(m, *shape))  # o_1..o_m
        else:
            self.centres = nn.Parameter(torch.randn(cfg.n_clusters, *shape) * cfg.init_std)  # V
            self.weights = nn.Parameter(torch.full((m + 1, cfg.n_clusters), 1.0 / cfg.n_clusters))  # w_0..w_m

    @property
    def n_users(self) -> int:
        return len(self.users)

    def index(self, names: Sequence[int | str | None]) -> torch.Tensor:
        """Indices of users; unseen ones and None get the generic index 0."""
        return torch.tensor([self._ids.get(n, GENERIC_USER) if n is not None else GENERIC_USER
                             for n in names], dtype=torch.long)

    def forward(self, user_ids: torch.Tensor) -> torch.Tensor:
        if user_ids.dim() != 1:
            raise ValueError(f"user_ids must be 1-d [batch], got shape {tuple(user_ids.shape)}")
        bad = user_ids[(user_ids < 0) | (user_ids > self.n_users)]
        if bad.numel():
            raise ValueError(f"user ids {bad.tolist()[:5]} outside 0..{self.n_users} "
                             "(map unseen users to 0 with UserModel.index)")
        kind = self.cfg.kind
        if kind == "uniform":
            return self.shared.unsqueeze(0).expand(len(user_ids), -1, -1)
        if kind == "individual":
            seen = (user_ids > 0).view(-1, 1, 1)
            offsets = self.offsets[(user_ids - 1).clamp(min=0)]
            # torch.where sends no gradient into the offset rows gathered for generic rows
            return self.generic.unsqueeze(0) + torch.where(seen, offsets, torch.zeros_like(offsets))
        return torch.einsum("bk,ktd->btd", self.weights[user_ids], self.centres)

    def save(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, out / WEIGHTS_FILE)
        (out / CONFIG_FILE).write_text(json.dumps(
            {"config": asdict(self.cfg), "embed_dim": self.embed_dim, "users": self.users}, indent=2))

    @classmethod
    def load(cls, in_dir: str | Path) -> UserModel:
        from safetensors.torch import load_file

        src = Path(in_dir)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            if not (src / name).exists():
                raise FileNotFoundError(f"UserModel.load: no {name} in {src}")
        meta = json.loads((src / CONFIG_FILE).read_text())
        model = cls(UserModelConfig(**meta["config"]), meta["embed_dim"], meta["users"])
        model.load_state_dict(load_file(src / WEIGHTS_FILE))
        return model


class PersonalizedLM(nn.Module):
    """A causal LM (plain or peft) with a user model in front: one module, so one optimizer
    (DeepSpeed engine) trains the LoRA and the user embeddings together and both save together."""

    def __init__(self, lm: nn.Module, user_model: UserModel):
        super().__init__()
        d = lm.get_input_embeddings().embedding_dim
        if user_model.embed_dim != d:
            raise ValueError(f"user model embed_dim={user_model.embed_dim} != LM embedding dim {d}")
        self.lm, self.user_model = lm, user_model

    def prefix(self, user_ids: torch.Tensor, text_ids: torch.Tensor | None = None,
               text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft prompt ``[B, P, d]`` and its mask ``[B, P]``: [text padding | implicit | text]."""
        embed = self.lm.get_input_embeddings()
        implicit = self.user_model(user_ids).to(embed.weight.dtype)
        mask = torch.ones(implicit.shape[:2], dtype=torch.long, device=implicit.device)
        if text_ids is None:
            return implicit, mask
        if text_mask is None:
            text_mask = torch.ones_like(text_ids)
        if text_ids.shape != text_mask.shape or text_ids.shape[0] != len(user_ids):
            raise ValueError(f"text_ids {tuple(text_ids.shape)} / text_mask {tuple(text_mask.shape)} "
                             f"do not match {len(user_ids)} users")
        explicit = embed(text_ids)
        width = text_ids.shape[1]
        rows, masks = [], []
        for b in range(len(user_ids)):  # row layout: padding, T_u implicit tokens, the row's text
            text = explicit[b, text_mask[b].bool()]
            pad = text.new_zeros(width - len(text), text.shape[-1])
            rows.append(torch.cat([pad, implicit[b], text]))
            masks.append(torch.cat([mask.new_zeros(len(pad)), mask[b], mask.new_ones(len(text))]))
        return torch.stack(rows), torch.stack(masks)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, user_ids: torch.Tensor,
                text_ids: torch.Tensor | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits aligned with ``input_ids`` (``[B, L, V]``), the user prefix in front."""
        prefix, prefix_mask = self.prefix(user_ids, text_ids, text_mask)
        embeds = torch.cat([prefix, self.lm.get_input_embeddings()(input_ids)], dim=1)
        mask = torch.cat([prefix_mask, attention_mask.to(prefix_mask.dtype)], dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        return logits[:, prefix.shape[1]:]

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], user_ids: torch.Tensor,
                 texts: Sequence[Sequence[int]] | None = None, max_new_tokens: int = 64,
                 eos_token_id: int | None = None, greedy: bool = True, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> list[list[int]]:
        """New token ids for each prompt (token ids) as user ``user_ids[b]`` (0: generic / unseen),
        with optional user text ids. Rows are left-padded [pad | implicit | text | prompt] and
        decoded with the KV cache; each row stops after its eos."""
        if len(prompts) != len(user_ids) or (texts is not None and len(texts) != len(prompts)):
            raise ValueError(f"{len(prompts)} prompts, {len(user_ids)} user ids and "
                             f"{'no' if texts is None else len(texts)} texts must match")
        was_training = self.training
        self.eval()
        try:
            embed = self.lm.get_input_embeddings()
            device = embed.weight.device
            implicit = self.user_model(user_ids.to(device)).to(embed.weight.dtype)
            rows = []
            for b, prompt in enumerate(prompts):
                ids = list(texts[b]) if texts is not None else []
                rows.append(torch.cat([implicit[b], embed(torch.tensor(ids + list(prompt), dtype=torch.long,
                                                                       device=device))]))
            width = max(len(r) for r in rows)
            embeds = torch.stack([torch.cat([r.new_zeros(width - len(r), r.shape[1]), r]) for r in rows])
            mask = torch.stack([torch.cat([torch.zeros(width - len(r), dtype=torch.long),
                                           torch.ones(len(r), dtype=torch.long)]) for r in rows]).to(device)
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
            new = torch.empty(len(rows), 0, dtype=torch.long, device=device)
            done = torch.zeros(len(rows), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                logits = out.logits[:, -1].float()
                if greedy:
                    token = logits.argmax(dim=-1)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                new = torch.cat([new, token.unsqueeze(1)], dim=1)
                if eos_token_id is not None:
                    done |= token == eos_token_id
                    if done.all():
                        break
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.lm(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=positions,
                              cache=out.cache, use_cache=True)
        finally:
            self.train(was_training)
        result = new.tolist()
        if eos_token_id is not None:
            result = [ids[:ids.index(eos_token_id) + 1] if eos_token_id in ids else ids for ids in result]
        return result

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the LM with adapters off (peft), no user tokens, eval, no grad."""
        was_training = self.training
        self.eval()
        disable = getattr(self.lm, "disable_adapter", None)
        try:
            with torch.no_grad(), (disable() if disable else contextlib.nullcontext()):
                yield self.lm
        finally:
            self.train(was_training)

    def save(self, out_dir: str | Path) -> None:
        """The LM's trainable part (a peft adapter, or the whole model) + the user model."""
        self.lm.save_pretrained(out_dir, safe_serialization=True)
        self.user_model.save(out_dir)
