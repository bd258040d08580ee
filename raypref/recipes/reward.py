"""Recipe: reward models on per-user preference pairs — Bradley-Terry (unconditional),
multi-objective regression (DPA §2.1), the personalized RM over a P-RLHF user model (P-RLHF §F.2:
α·BT(user) + (1−α)·BT(generic user 0)) and the VAE conditional RM (Liu 2025 §3.4) with adaptive
sampling (Liu 2025 §4.2.2), a contrastive term on latent means (Liu 2025 eq. 12) and MGDA / PCGrad over
per-user objectives (Liu 2025 §4.3). `RewardConfig` + `RewardSpec`, trained by `train.runner.run`;
`evaluate` gives per-user test accuracy.

Per-user gradient surgery inside the runner: `loss` takes the per-user gradients itself,
combines them, and returns a surrogate whose gradient is the combined direction and whose
value is the true loss, so the DeepSpeed engine steps on it unchanged (ZeRO stage 0-2: stage 3
partitions the parameters the per-user gradients are taken against).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from raypref.algos.contrastive import latent_contrastive_loss
from raypref.algos.gradients import flat_grad, mgda_direction, pcgrad_direction
from raypref.algos.reward import bt_loss, multi_objective_mse, pair_accuracy, rescale, scalarize
from raypref.algos.vae import kl_to_standard_normal
from raypref.config import check_fields
from raypref.data.sampling import AdaptiveSampler, DemonstrationSampler, UniformSampler
from raypref.models.reward import (CONDITIONINGS, EncoderConfig, MultiObjectiveRewardModel,
                                   PersonalizedRewardModel, ScalarRewardModel, VAEConfig,
                                   VAERewardModel, build_frozen_encoder, build_text_encoder)
from raypref.models.user_model import UserModel, UserModelConfig
from raypref.recipes.reward_data import (RATINGS, WORLD, RewardDataConfig, UserPairs,
                                         attribute_targets, build_pairs, demo_embeddings,
                                         load_embeddings, pair_embeddings)
from raypref.rewards.load import CONFIG_FILE
from raypref.train.runner import Optimization
from raypref.train.spec import LoopSpec, Role, StepContext, save_module

METHODS = ("bt", "multi_objective", "user_model", "vae")
SAMPLINGS = ("uniform", "adaptive")
GRADIENTS = ("sum", "pcgrad", "mgda")
ROLE = "reward"
LATENTS_FILE = "latent_means.safetensors"  # vae: latent means per evaluation (Liu 2025 fig. 15)
LATENT_DRAWS = 20  # demonstration sets per user embedded at each evaluation


@dataclass
class RewardTraining(Optimization):
    """Liu 2025 Table 1: lr 1e-4, AdamW weight decay 1e-3, 3% warm-up (6 of 200 steps)."""
    steps: int = 200
    micro_batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 6
    weight_decay: float = 1e-3


VAE_CONTRASTIVE = 0.5  # the VAE's default coefficient of Liu 2025 eq. 12 (0.5 in the report)


@dataclass
class RewardConfig:
    method: str = "vae"                          # bt | multi_objective | user_model | vae
    encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(max_length=160))
    # frozen: the query encoder is the frozen demonstration encoder and every pair's
    # embeddings are computed once, so a step trains the heads only (fast on CPU); the
    # issue's acceptance setting fine-tunes it (False)
    freeze_query_encoder: bool = False
    vae: VAEConfig = field(default_factory=VAEConfig)
    # user_model (P-RLHF §F.2): individual e_0 + o_i or cluster V·w_i embeddings, used as the
    # linear head (n_tokens must be 1) or as a soft prompt of n_tokens tokens
    user_model: UserModelConfig = field(default_factory=lambda: UserModelConfig(n_tokens=1))
    conditioning: str = "head"                   # head | soft_prompt
    alpha: float = 0.5                           # weight of the user term; 1 - alpha: generic
    beta: float = 1e-3                           # KL weight (Liu 2025 eq. 8: 0 or small)
    sampling: str = "uniform"                    # uniform | adaptive
    adaptive_ratio: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # N_A:N_B:N_C
    phase_steps: int = 0                         # steps per adaptive phase; 0 = steps // users
    user_order: list[int] | None = None          # order users enter group B; None = by id
    # coefficient of Liu 2025 eq. 12; None = the method's default: 0.5 for vae (the VAE that
    # learns: without it the VAE scored both users as one at chance, docs/RESULTS.md), 0 for the
    # others. 0 with method=vae is the bare VAE, an ablation
    contrastive: float | None = None
    gradient: str = "sum"                        # sum | pcgrad | mgda over per-user losses
    eval_pairs_per_user: int = 100
    # peak lr of the parts trained from scratch (heads, user model, VAE posterior and decoder);
    # 0 = training.lr. The pretrained encoder keeps training.lr. jobs/reward.py sets 1e-3: with
    # every part at 1e-4 the plain VAE stayed at chance for 200 steps even on the clean world
    head_lr: float = 0.0
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    training: RewardTraining = field(default_factory=RewardTraining)

    @property
    def contrastive_weight(self) -> float:
        """The contrastive coefficient this method trains with (`contrastive`, resolved)."""
        if self.contrastive is None:
            return VAE_CONTRASTIVE if self.method == "vae" else 0.0
        return self.contrastive

    def validate(self) -> None:
        checks = [("method", self.method in METHODS, f"expected one of {METHODS}"),
                  ("sampling", self.sampling in SAMPLINGS, f"expected one of {SAMPLINGS}"),
                  ("gradient", self.gradient in GRADIENTS, f"expected one of {GRADIENTS}"),
                  ("beta", self.beta >= 0, "must be >= 0"),
                  ("conditioning", self.conditioning in CONDITIONINGS,
                   f"expected one of {CONDITIONINGS}"),
                  ("alpha", 0.0 <= self.alpha <= 1.0, "must be in [0, 1]"),
                  ("contrastive", self.contrastive is None or self.contrastive >= 0, "must be >= 0"),
                  ("phase_steps", self.phase_steps >= 0, "must be >= 0"),
                  ("eval_pairs_per_user", self.eval_pairs_per_user >= 1, "must be >= 1"),
                  ("head_lr", 0 <= self.head_lr <= 1, "must be in [0, 1] (0 = training.lr)"),
                  ("adaptive_ratio", len(self.adaptive_ratio) == 3 and min(self.adaptive_ratio) >= 0
                   and sum(self.adaptive_ratio) > 0, "must be 3 non-negative numbers, not all 0")]
        check_fields("RewardConfig", self, checks)
        if self.method != "vae" and self.contrastive:  # an explicit coefficient only
            raise ValueError(f"RewardConfig.contrastive={self.contrastive}: only the vae method "
                             "has latent means to contrast")
        if self.method == "multi_objective" and self.gradient != "sum":
            raise ValueError("RewardConfig.gradient: multi_objective regresses attribute scores; "
                             "per-user gradient surgery applies to bt and vae")
        if self.data.source != WORLD and self.data.has_ratings and self.method != "multi_objective":
            raise ValueError(f"RewardConfig.data.source={self.data.source!r}: real fine-grained "
                             f"ratings train the multi_objective method, not {self.method!r}")
        if not self.data.has_ratings and self.method == "multi_objective":
            raise ValueError(f"RewardConfig.data.schema={self.data.schema!r}: preference pairs carry no "
                             "per-attribute ratings to regress; use bt, user_model or vae")
        if self.method == "user_model":
            self.user_model.validate()
            if self.conditioning == "head" and self.user_model.n_tokens != 1:
                raise ValueError(f"RewardConfig.user_model.n_tokens={self.user_model.n_tokens}: "
                                 "a linear-head user embedding is one vector (n_tokens=1)")
            if self.conditioning == "soft_prompt" and self.freeze_query_encoder:
                raise ValueError("RewardConfig.conditioning='soft_prompt' passes the user tokens "
                                 "through the encoder: it cannot use freeze_query_encoder=true "
                                 "(cached embeddings)")
        self.encoder.validate()
        self.vae.validate()
        self.data.validate()
        self.training.validate("RewardConfig.training")


@dataclass
class RewardSpec(LoopSpec):
    cfg: RewardConfig
    demo_embeddings_path: str | None = None   # precomputed pool embeddings (vae); None = on worker
    seed: int = 0
    # frozen query encoder: every pair's embeddings precomputed once for all runs on this data
    # (`precompute_query_embeddings`); None = computed on the worker
    query_embeddings_path: str | None = None

    def __post_init__(self):
        self.cfg.validate()
        self._pairs: dict[int, UserPairs] | None = None
        self._demos: dict[int, torch.Tensor] | None = None
        self._queries: dict[tuple[int, str], torch.Tensor] | None = None
        self._latents: dict[str, torch.Tensor] = {}  # "step<k>/user<id>" -> [draws, latent]

    def __getstate__(self):  # data is rebuilt on the worker, never pickled with the spec
        state = dict(self.__dict__)
        state["_pairs"] = state["_demos"] = state["_queries"] = None
        return state

    # ------------------------------------------------------------ data
    @property
    def pairs(self) -> dict[int, UserPairs]:
        if self._pairs is None:
            self._pairs = build_pairs(self.cfg.data)
        return self._pairs

    def query_embeddings(self) -> dict[tuple[int, str], torch.Tensor]:
        """(user id, "train" | "test") -> [n, 2, E] frozen embeddings of every pair (frozen
        query encoder only), computed once on the worker."""
        if self._queries is None:
            if self.query_embeddings_path:
                saved = load_embeddings_by_key(Path(self.query_embeddings_path))
                self._queries = {(int(k.split("/")[0]), k.split("/")[1]): v for k, v in saved.items()}
                missing = sorted(set(self.pairs) - {uid for uid, _ in self._queries})
                if missing:
                    raise ValueError(f"{self.query_embeddings_path}: no pair embeddings of user(s) {missing}")
            else:
                self._queries = query_embeddings(self.cfg, self.pairs)
        return self._queries

    def demos(self) -> dict[int, torch.Tensor]:
        if self._demos is None:
            if self.cfg.freeze_query_encoder and not self.demo_embeddings_path:
                pool = self.cfg.data.demo_pool  # the pool is the first train pairs: reuse
                self._demos = {uid: self.query_embeddings()[(uid, "train")][:pool]
                               for uid in self.pairs}
            elif self.demo_embeddings_path:
                self._demos = load_embeddings(Path(self.demo_embeddings_path))
            else:
                self._demos = demo_embeddings(self.pairs, self.cfg.data.demo_pool,
                                              build_demo_encoder(self.cfg))
            missing = sorted(set(self.pairs) - set(self._demos))
            if missing:
                raise ValueError(f"demonstration embeddings lack user(s) {missing}")
        return self._demos

    def _batch_sampler(self, rank: int, grad_accum: int):
        sizes = {uid: len(up.train) for uid, up in self.pairs.items()}
        seed = self.seed * 1000 + rank
        if self.cfg.sampling == "uniform":
            return UniformSampler(sizes, self.cfg.training.micro_batch_size, seed)
        phase = self.cfg.phase_steps or max(1, self.cfg.training.steps // len(sizes))
        return AdaptiveSampler(sizes, self.cfg.training.micro_batch_size, phase * grad_accum,
                               tuple(self.cfg.adaptive_ratio),
                               tuple(self.cfg.user_order) if self.cfg.user_order else None, seed)

    def _demo_sampler(self, seed: int) -> DemonstrationSampler:
        return DemonstrationSampler({u: len(up.train) for u, up in self.pairs.items()},
                                    self.cfg.data.n_demos, self.cfg.data.demo_pool, seed)

    # ------------------------------------------------------------ LoopSpec
    def roles(self) -> dict[str, Role]:
        return {ROLE: Role()}

    def build_model(self, role: str = ROLE) -> torch.nn.Module:
        return build_reward_model(self.cfg, users=sorted(self.pairs))

    def param_groups(self, role: str, model: torch.nn.Module) -> list[dict]:
        """The pretrained encoder at training.lr; everything trained from scratch at head_lr."""
        encoder = {id(p) for p in query_encoder(model).parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        pretrained = [p for p in trainable if id(p) in encoder]
        fresh = [p for p in trainable if id(p) not in encoder]
        groups = [{"params": pretrained}] if pretrained else []
        if fresh:
            groups.append({"params": fresh, **({"lr": self.cfg.head_lr} if self.cfg.head_lr else {})})
        return groups

    def batches(self, ctx: StepContext) -> Iterator[dict]:
        sampler = self._batch_sampler(ctx.rank, ctx.grad_accum)
        vae = self.cfg.method == "vae"  # only the VAE reads demonstrations
        demo_sampler = self._demo_sampler(self.seed * 1000 + ctx.rank) if vae else None
        n_train = sum(len(up.train) for up in self.pairs.values())
        tokenizer_model = ctx.models[ROLE]
        for micro in range(ctx.micro_batches_done, ctx.max_steps * ctx.grad_accum):
            picks = sampler.batch(micro + 1)
            epoch = micro * len(picks) // n_train
            yield self.collate(tokenizer_model, picks, demo_sampler, epoch)

    def collate(self, model, picks: list[tuple[int, int]], demo_sampler: DemonstrationSampler,
                epoch: int) -> dict:
        """A micro-batch of (user, index into the user's train pairs) picks; ``train`` pairs
        only — evaluation builds its own from the test pairs."""
        batch = self._encode(model, picks, "train")
        if self.cfg.method == "vae":
            demos = self.demos()
            batch["demos"] = torch.stack([demos[u][demo_sampler.demos(u, i, epoch)]
                                          for u, i in picks])
        return batch

    def _encode(self, model, picks: list[tuple[int, int]], split: str) -> dict:
        """Tokens (or, with a frozen query encoder, cached embeddings) of the picked pairs."""
        records = [getattr(self.pairs[u], split)[i] for u, i in picks]
        batch = {"user_ids": torch.tensor([u for u, _ in picks])}
        if self.cfg.freeze_query_encoder:
            cache = self.query_embeddings()
            emb = torch.stack([cache[(u, split)][i] for u, i in picks])
            batch["chosen_emb"], batch["rejected_emb"] = emb[:, 0], emb[:, 1]
        else:
            encoder = query_encoder(model)
            prompts = [r.prompt for r in records]
            batch["chosen"] = encoder.tokenize(prompts, [r.chosen for r in records])
            batch["rejected"] = encoder.tokenize(prompts, [r.rejected for r in records])
        if self.cfg.method == "multi_objective":
            attributes, scale, _ = RATINGS[self.cfg.data.ratings]
            for side in ("chosen", "rejected"):
                scores = torch.tensor([attribute_targets(getattr(r, f"{side}_scores"), attributes)
                                       for r in records])
                batch[f"{side}_targets"] = rescale(scores, *scale)
        return batch

    def loss(self, batch: dict, ctx: StepContext):
        model = ctx.models[ROLE]
        batch = _to(batch, ctx.device)
        out = self._forward(model, batch)
        metrics = {"acc": float(pair_accuracy(out["r_chosen"], out["r_rejected"]).mean())}
        if self.cfg.method == "multi_objective":
            loss = 0.5 * sum(  # unrated attributes (NaN, e.g. UltraFeedback's "N/A") masked
                multi_objective_mse(out[f"pred_{side}"], batch[f"{side}_targets"].nan_to_num(),
                                    mask=~batch[f"{side}_targets"].isnan())
                for side in ("chosen", "rejected"))
            return loss, {**metrics, "mse": float(loss.detach())}
        per_pair = -torch.nn.functional.logsigmoid(out["r_chosen"] - out["r_rejected"])
        if self.cfg.method == "user_model" and self.cfg.alpha < 1:
            # P-RLHF §F.2 (algos.reward.personalized_bt_loss) kept per pair, so that gradient
            # surgery can split it by user
            generic = -torch.nn.functional.logsigmoid(out["generic_chosen"] - out["generic_rejected"])
            per_pair = self.cfg.alpha * per_pair + (1 - self.cfg.alpha) * generic
            metrics["generic_acc"] = float(pair_accuracy(out["generic_chosen"],
                                                         out["generic_rejected"]).mean())
        if self.cfg.method == "vae":
            kl = kl_to_standard_normal(out["mu"], out["logvar"])
            per_pair = per_pair + self.cfg.beta * kl
            metrics["kl"] = float(kl.detach().mean())
        shared = torch.zeros((), device=per_pair.device)
        if self.cfg.contrastive_weight and len(batch["user_ids"]) >= 2:
            shared = self.cfg.contrastive_weight * latent_contrastive_loss(out["mu"], batch["user_ids"])
        metrics["contrastive"] = float(shared.detach())
        loss = per_pair.mean() + shared
        metrics["bt"] = float(bt_loss(out["r_chosen"], out["r_rejected"]).detach())
        if self.cfg.gradient == "sum":
            return loss, metrics
        return self._surgery(model, per_pair, shared, batch["user_ids"], loss, metrics)

    def _surgery(self, model, per_pair, shared, user_ids, loss, metrics):
        """Combine the per-user gradients by PCGrad or MGDA; return a surrogate whose gradient
        is that direction (plus the shared contrastive gradient) and whose value is ``loss``."""
        params = [p for p in model.parameters() if p.requires_grad]
        users = torch.unique(user_ids)
        stack = torch.stack([flat_grad(per_pair[user_ids == u].mean(), params) for u in users])
        if self.cfg.gradient == "pcgrad":
            direction = pcgrad_direction(stack)
        else:
            direction, _ = mgda_direction(stack)
        if shared.requires_grad:
            direction = direction + flat_grad(shared, params)
        metrics["conflict"] = float(len(users) == 2 and float(stack[0] @ stack[1]) < 0)
        offset, surrogate = 0, loss.detach()
        for p in params:
            d = direction[offset:offset + p.numel()].view_as(p).detach()
            surrogate = surrogate + (p * d).sum() - (p * d).sum().detach()
            offset += p.numel()
        return surrogate, metrics

    def _forward(self, model, batch) -> dict:
        cached = "chosen_emb" in batch
        if self.cfg.method in ("bt", "multi_objective"):
            if cached:
                pc, pr = (model.score_embedding(batch["chosen_emb"]),
                          model.score_embedding(batch["rejected_emb"]))
            else:
                pc, pr = model(**batch["chosen"]), model(**batch["rejected"])
        if self.cfg.method == "bt":
            return {"r_chosen": pc, "r_rejected": pr}
        if self.cfg.method == "user_model":
            return self._forward_user_model(model, batch, cached)
        if self.cfg.method == "multi_objective":
            w = torch.stack([self._user_weights()[int(u)] for u in batch["user_ids"]]).to(pc.device)
            return {"pred_chosen": pc, "pred_rejected": pr,
                    "r_chosen": scalarize(pc, w), "r_rejected": scalarize(pr, w)}
        demos = batch["demos"]
        if not cached:
            rc, rr, mu, logvar = model(batch["chosen"], batch["rejected"], demos[:, :, 0],
                                       demos[:, :, 1])
            return {"r_chosen": rc, "r_rejected": rr, "mu": mu, "logvar": logvar}
        z, mu, logvar = model.user_latent(demos[:, :, 0], demos[:, :, 1])
        return {"r_chosen": model.reward_from_embedding(batch["chosen_emb"], z),
                "r_rejected": model.reward_from_embedding(batch["rejected_emb"], z),
                "mu": mu, "logvar": logvar}

    def _forward_user_model(self, model: PersonalizedRewardModel, batch: dict, cached: bool) -> dict:
        """Rewards under each pair's user and under the generic user 0 (skipped at alpha = 1,
        where the generic term has no weight)."""
        index = model.user_model.index(batch["user_ids"].tolist()).to(batch["user_ids"].device)
        want_generic = self.cfg.alpha < 1.0
        out = {}
        for tag, users in (("r", index), ("generic", torch.zeros_like(index)))[:1 + want_generic]:
            for side in ("chosen", "rejected"):
                out[f"{tag}_{side}"] = (model.score_embedding(batch[f"{side}_emb"], users) if cached
                                        else model(**batch[side], user_index=users))
        return out

    def _user_weights(self) -> dict[int, torch.Tensor]:
        attributes = RATINGS[self.cfg.data.ratings][0]
        return {uid: torch.tensor([up.user.weights.get(a, 0.0) for a in attributes])
                for uid, up in self.pairs.items()}

    def evaluate(self, ctx: StepContext) -> dict[str, float]:
        """Per-user accuracy on the user's test pairs (VAE: fixed demonstrations per query,
        z = mu; multi-objective: scalarized by the user's true weights)."""
        model = ctx.models[ROLE]
        demo_sampler = self._demo_sampler(seed=10_000 + self.seed) if self.cfg.method == "vae" else None
        accs = {}
        for uid, up in self.pairs.items():
            test = up.test[:self.cfg.eval_pairs_per_user]
            hits = []
            for start in range(0, len(test), 32):
                chunk = test[start:start + 32]
                batch = self._encode(model, [(uid, start + k) for k in range(len(chunk))], "test")
                if self.cfg.method == "vae":  # demonstrations from the user's train pool
                    demos = self.demos()[uid]
                    batch["demos"] = torch.stack(
                        [demos[demo_sampler.demos(uid, len(up.train) + start + k, 0)]
                         for k in range(len(chunk))])
                out = self._forward(model, _to(batch, ctx.device))
                hits.append(pair_accuracy(out["r_chosen"], out["r_rejected"]))
            accs[f"acc.user{uid}"] = float(torch.cat(hits).mean())
        values = list(accs.values())
        if self.cfg.method == "vae":
            self._snapshot_latents(model, ctx)
        return {**accs, "acc.mean": float(np.mean(values)), "acc.min": float(np.min(values))}

    def _snapshot_latents(self, model, ctx: StepContext) -> None:
        """Latent means of LATENT_DRAWS demonstration sets per user, kept per evaluation step
        (in the spec state, so a resumed run keeps them) for the t-SNE of Liu 2025 fig. 15."""
        sampler = self._demo_sampler(seed=20_000 + self.seed)
        for uid in self.pairs:
            pool = self.demos()[uid]
            sets = torch.stack([pool[sampler.demos(uid, 10 ** 6 + k, 0)]
                                for k in range(LATENT_DRAWS)]).to(ctx.device)
            _, mu, _ = model.user_latent(sets[:, :, 0], sets[:, :, 1], sample=False)
            self._latents[f"step{ctx.step}/user{uid}"] = mu.detach().float().cpu()

    def state_dict(self) -> dict:
        return {"latents": dict(self._latents)}

    def load_state_dict(self, state: dict) -> None:
        self._latents = dict(state.get("latents", {}))

    def export(self, models: dict[str, torch.nn.Module], out_dir: Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_module(models[ROLE], out_dir)
        config = dataclasses.asdict(self.cfg)
        if self.cfg.method == "user_model":  # the seen users, in index order, to rebuild it
            config["users"] = list(models[ROLE].user_model.users)
        if self.cfg.method == "multi_objective":
            config["attributes"] = list(models[ROLE].attributes)
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=1))
        if self._latents:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in self._latents.items()},
                      str(out_dir / LATENTS_FILE))


# ---------------------------------------------------------------- building models

def build_reward_model(cfg: RewardConfig, users: list[int] | None = None) -> torch.nn.Module:
    """``users``: the seen user ids of a user_model RM (index i+1 each; 0 is generic)."""
    # frozen: the very encoder whose embeddings the spec caches, so the exported model
    # scores raw text exactly as training saw it
    encoder = build_demo_encoder(cfg) if cfg.freeze_query_encoder else build_text_encoder(cfg.encoder)
    if cfg.method == "bt":
        return ScalarRewardModel(encoder)
    if cfg.method == "multi_objective":
        return MultiObjectiveRewardModel(encoder, RATINGS[cfg.data.ratings][0])
    if cfg.method == "user_model":
        if not users:
            raise ValueError("build_reward_model: a user_model RM needs its seen user ids")
        user_model = UserModel(cfg.user_model, encoder.hidden_size, list(users))
        return PersonalizedRewardModel(encoder, user_model, cfg.conditioning)
    return VAERewardModel(encoder, demo_dim=encoder.hidden_size, cfg=cfg.vae)


def build_demo_encoder(cfg: RewardConfig):
    """The frozen demonstration encoder (the query encoder's starting point)."""
    return build_frozen_encoder(cfg.encoder)


def query_encoder(model: torch.nn.Module):
    return model.query_encoder if isinstance(model, VAERewardModel) else model.encoder


def query_embeddings(cfg: RewardConfig, pairs: dict[int, UserPairs]) -> dict[tuple[int, str], torch.Tensor]:
    """(user id, "train" | "test") -> [n, 2, E]: the frozen encoder's embeddings of every train
    pair and of the evaluated test pairs."""
    encoder = build_demo_encoder(cfg)
    out = {}
    for uid, up in pairs.items():
        out[(uid, "train")] = pair_embeddings(up.train, encoder)
        out[(uid, "test")] = pair_embeddings(up.test[:cfg.eval_pairs_per_user], encoder)
    return out


def precompute_query_embeddings(cfg: RewardConfig, path: Path) -> Path:
    """Every pair embedded once by the frozen encoder (driver side), for runs that differ only in
    method, seed or training settings."""
    from safetensors.torch import save_file

    embeddings = query_embeddings(cfg, build_pairs(cfg.data))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({f"{uid}/{split}": t.contiguous() for (uid, split), t in embeddings.items()}, str(tmp))
    tmp.replace(path)
    return path


def load_embeddings_by_key(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise FileNotFoundError(f"pair embeddings file {path} does not exist "
                                "(precompute it with recipes.reward.precompute_query_embeddings)")
    return load_file(str(path))


def precompute_demo_embeddings(cfg: RewardConfig, path: Path) -> Path:
    """Embed every user's demonstration pool once with the frozen encoder (driver side)."""
    from raypref.recipes.reward_data import save_embeddings

    save_embeddings(demo_embeddings(build_pairs(cfg.data), cfg.data.demo_pool,
                                    build_demo_encoder(cfg)), Path(path))
    return Path(path)


def _to(batch: dict, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = {k: v.to(device) for k, v in value.items()}
        else:
            out[key] = value.to(device)
    return out
