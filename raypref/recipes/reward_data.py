"""Preference data of the reward-model recipes: per-user train / test pairs from the simulated
world, each user's demonstration pool, and the pool's frozen embeddings (computed once).

Populations: "two_user_conflict" (Liu 2025 §3.5.1: helpfulness-only vs honesty-only, pairs both
users order alike dropped) or "cluster" (Liu 2025 §3.3.1's Dirichlet cluster users; ``n_users``
taken round-robin over the three clusters).

Real fine-grained ratings instead (multi-objective regression, DPA §2.1): ``source`` a local
file or folder read with the loader ``schema`` (helpsteer | ultrafeedback), validated with a
quarantine; its pairs belong to one user (id 1) whose weights are the loader's quality
weights, shuffled by ``world_seed`` and split into test and train pairs.

Real text judged (bt, user_model, vae): ``source: pool``, the shared candidate pool of a base LM
(`recipes.pool`, settings under ``pool``), labelled by the text judges for users who weigh
verbosity, expertise and friendliness (`pool_population`); see `pool_pairs`.

Your own preference pairs (bt, user_model, vae): ``schema`` one of ``PAIR_SCHEMAS`` (TRL's
standard or conversational rows, PRISM, binarized UltraFeedback); with ``user_column`` (trl) or
PRISM's users each user's pairs are split apart (``test_pairs_per_user`` held out each), else
every pair belongs to user 1. A user with too few pairs for that split is left out and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raypref.data.loaders import HELPSTEER_ATTRIBUTES, HELPSTEER_QUALITY, ULTRAFEEDBACK_ASPECTS
from raypref.data.records import PreferenceRecord
from raypref.data.users import User, two_user_conflict, ultrafeedback_cluster
from raypref.data.world import ASPECTS, World
from raypref.recipes.pool import PoolConfig

POPULATIONS = ("two_user_conflict", "cluster")
WORLD = "world"
POOL = "pool"  # the shared candidate pool of real text (recipes/pool.py), judged by the text judges
POOL_ATTRIBUTES = ("verbosity", "expertise", "friendliness")  # what the pool's users weigh
PAIR_SCHEMAS = ("trl", "prism", "ultrafeedback_binarized")  # pairs without per-attribute ratings
# attributes a multi-objective RM regresses, their rating scale (rescaled to 0-100), and the
# weights of the user a real source's pairs belong to
RATINGS = {WORLD: (ASPECTS, (1.0, 5.0), None),
           "ultrafeedback": (ULTRAFEEDBACK_ASPECTS, (1.0, 5.0),
                             {a: 1.0 for a in ULTRAFEEDBACK_ASPECTS}),
           "helpsteer": (HELPSTEER_ATTRIBUTES, (0.0, 4.0), HELPSTEER_QUALITY)}


@dataclass
class RewardDataConfig:
    population: str = "two_user_conflict"  # or "cluster"
    n_users: int = 10             # cluster population only
    difficulty: float = 0.5       # World difficulty: weak, noisy aspect cues + label noise
    label_noise: float | None = None  # choice flips (test labels too); None = 0.25 * difficulty
    world_seed: int = 0
    train_pairs_per_user: int = 400
    test_pairs_per_user: int = 100
    demo_pool: int = 100          # the first demo_pool train pairs of a user are its pool
    n_demos: int = 8              # demonstrations per query (Liu 2025 Table 1: 8 of 100)
    source: str = WORLD           # "world" (simulated users), "pool" (real text) or a local file / folder
    # loader schema of a real source: helpsteer | ultrafeedback (ratings, multi_objective), or
    # trl | prism | ultrafeedback_binarized (pairs, the other methods)
    schema: str = "helpsteer"
    max_quarantine_fraction: float = 0.5  # real source: HelpSteer has many equal-quality ties
    split: str = ""               # real source: split of a hub dataset or saved DatasetDict
    user_column: str = ""         # trl source: the column naming each row's user
    pool: PoolConfig = field(default_factory=PoolConfig)  # source "pool" only

    @property
    def ratings(self) -> str:
        return WORLD if self.source == WORLD else self.schema

    @property
    def has_ratings(self) -> bool:
        """Whether its responses carry per-attribute ratings (the world's, or a ratings file's);
        the pool's judge scores label pairs, they are not ratings to regress."""
        return self.source == WORLD or (self.source != POOL and self.schema in RATINGS)

    @property
    def has_judge(self) -> bool:
        """Whether its users' labels come from judges the reference row can re-read."""
        return self.source in (WORLD, POOL)

    def validate(self) -> None:
        known = sorted(set(RATINGS) - {WORLD}) + list(PAIR_SCHEMAS)
        if self.source == POOL:
            self.pool.validate()
            missing = set(POOL_ATTRIBUTES) - set(self.pool.judges)
            if missing:
                raise ValueError(f"data.pool.judges={self.pool.judges}: the pool's users weigh "
                                 f"{sorted(missing)} too; add them")
        elif self.source != WORLD and self.schema not in known:
            raise ValueError(f"data.schema={self.schema!r}: a real source needs one of {known}")
        if self.user_column and self.schema != "trl":
            raise ValueError(f"data.user_column={self.user_column!r}: only the trl schema has a user column")
        if self.population not in POPULATIONS:
            raise ValueError(f"data.population={self.population!r}: expected one of {POPULATIONS}")
        if self.population == "cluster" and not 2 <= self.n_users <= 99:
            raise ValueError(f"data.n_users={self.n_users}: must be in 2..99 for 'cluster'")
        for name in ("difficulty", "label_noise"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"data.{name}={value}: must be in [0, 1]")
        if self.n_demos < 1 or self.demo_pool <= self.n_demos:
            raise ValueError(f"data.n_demos={self.n_demos}, data.demo_pool={self.demo_pool}: "
                             "need 1 <= n_demos < demo_pool (a query is never its own demo)")
        if self.train_pairs_per_user < self.demo_pool:
            raise ValueError(f"data.train_pairs_per_user={self.train_pairs_per_user} must be >= "
                             f"data.demo_pool={self.demo_pool}")
        if self.test_pairs_per_user < 1:
            raise ValueError(f"data.test_pairs_per_user={self.test_pairs_per_user}: must be >= 1")


def population(cfg: RewardDataConfig) -> list[User]:
    if cfg.source == POOL:
        return pool_population(cfg)
    if cfg.population == "two_user_conflict":
        return two_user_conflict()
    users = ultrafeedback_cluster(cfg.world_seed)
    by_group: dict[str, list[User]] = {}
    for u in users:
        if u.group.startswith("cluster"):
            by_group.setdefault(u.group, []).append(u)
    groups = sorted(by_group)
    picked = [by_group[groups[i % len(groups)]][i // len(groups)] for i in range(cfg.n_users)]
    return sorted(picked, key=lambda u: u.user_id)


def pool_population(cfg: RewardDataConfig) -> list[User]:
    """The pool's users, weights over `POOL_ATTRIBUTES` (scores in units of their spread on the pool).

    ``two_user_conflict``: user 1 weighs verbosity alone, user 2 friendliness alone; as in Liu
    2025 §3.5.1 (two users, each caring for one attribute), the pairs both order alike are dropped.
    ``cluster``: ``n_users`` users round-robin over P-Soups's 8 combinations (P1A+P2A+P3A ...
    P1B+P2B+P3B), signs from the combination (elementary: expertise −, PhD: +; concise: verbosity
    −, informative: +; friendly: friendliness +, unfriendly: −), sizes a Dirichlet(2, 2, 2) draw
    by ``world_seed``: users of one combination are alike, opposite combinations conflict."""
    from raypref.data.users import psoups_combinations, psoups_profile, text_attribute

    zeros = {a: 0.0 for a in POOL_ATTRIBUTES}
    if cfg.population == "two_user_conflict":
        return [User(1, {**zeros, "verbosity": 1.0}, None, "verbosity"),
                User(2, {**zeros, "friendliness": 1.0}, None, "friendliness")]
    combos = psoups_combinations()
    sizes = np.random.default_rng(cfg.world_seed).dirichlet((2.0, 2.0, 2.0), size=cfg.n_users)
    users = []
    for i in range(cfg.n_users):
        combo = combos[i % len(combos)]
        weights = dict(zeros)
        for name, size in zip(combo, sizes[i]):
            profile = psoups_profile(name)
            weights[text_attribute(name)] = float(profile.direction * size)
        users.append(User(i + 1, weights, None, "+".join(combo)))
    return users


@dataclass
class UserPairs:
    user: User
    train: list[PreferenceRecord]
    test: list[PreferenceRecord]


def build_pairs(cfg: RewardDataConfig) -> dict[int, UserPairs]:
    """Deterministic in cfg: the same pairs on every worker and in every rerun."""
    cfg.validate()
    if cfg.source == POOL:
        return pool_pairs(cfg)
    if cfg.source != WORLD:
        return real_pairs(cfg)
    world = World.from_config(cfg)
    users = population(cfg)
    other = {u.user_id: (users[1 - i] if cfg.population == "two_user_conflict" else None)
             for i, u in enumerate(users)}
    out = {}
    for u in users:
        rng = np.random.default_rng([cfg.world_seed, u.user_id])
        train = world.pairs_for_user(u, cfg.train_pairs_per_user, rng, other[u.user_id], "train")
        test = world.pairs_for_user(u, cfg.test_pairs_per_user, rng, other[u.user_id], "test")
        out[u.user_id] = UserPairs(u, train, test)
    return out


def pool_scores(cfg: RewardDataConfig):
    """(pool, {attribute: scores [candidates]} in units of each judge's standard deviation on the
    pool): verbosity in words, expertise in grades and friendliness in sentiment put on one footing."""
    from raypref.recipes.pool import load_pool
    from raypref.rewards.text import pool_scales

    pool = load_pool(cfg.pool)
    if not pool.scores:
        raise FileNotFoundError(f"the candidate pool in {pool.folder} is not judged yet: run "
                                "`python jobs/pool.py` with the same pool settings")
    raw = {a: pool.scores[a] for a in POOL_ATTRIBUTES}
    scales = pool_scales(raw)
    return pool, {a: raw[a] / scales[a] for a in POOL_ATTRIBUTES}


def pool_pairs(cfg: RewardDataConfig) -> dict[int, UserPairs]:
    """Each user's pairs from the judged pool: two answers to one prompt (any two system prompts
    or samples), train pairs from the train prompts and test pairs from the test prompts (the
    prompts are disjoint), drawn without replacement in an order fixed by (``world_seed``, user,
    split). The user prefers the answer of higher utility (``User.utility`` of the scaled judge
    scores); exact ties are skipped, and in the two-user conflict so are the pairs both users
    order alike. Each choice flips with probability ``label_noise`` (None: 0.25 · difficulty), the
    test labels too, as in the world."""
    pool, scaled = pool_scores(cfg)
    users = population(cfg)
    noise = 0.25 * cfg.difficulty if cfg.label_noise is None else cfg.label_noise
    conflict = cfg.population == "two_user_conflict"
    out = {}
    for i, u in enumerate(users):
        other = users[1 - i] if conflict else None
        train, test = (_pool_user_pairs(pool, scaled, u, other, split, n, noise,
                                        np.random.default_rng([cfg.world_seed, u.user_id, k]))
                       for k, (split, n) in enumerate((("train", cfg.train_pairs_per_user),
                                                       ("test", cfg.test_pairs_per_user))))
        out[u.user_id] = UserPairs(u, train, test)
    return out


def _pool_user_pairs(pool, scaled: dict[str, np.ndarray], user: User, other: User | None, split: str,
                     n: int, noise: float, rng: np.random.Generator) -> list[PreferenceRecord]:
    from itertools import combinations

    candidates = [pair for idx in pool.by_prompt(split).values() for pair in combinations(idx, 2)]
    scores = [{a: float(v[i]) for a, v in scaled.items()} for i in range(len(pool.candidates))]
    records = []
    for k in rng.permutation(len(candidates)):
        if len(records) == n:
            break
        a, b = candidates[k]
        margin = user.utility(scores[a]) - user.utility(scores[b])
        if margin == 0:
            continue
        if other is not None:
            against = other.utility(scores[a]) - other.utility(scores[b])
            if against == 0 or (against > 0) == (margin > 0):
                continue
        better, worse = (a, b) if margin > 0 else (b, a)
        if rng.random() < noise:
            better, worse = worse, better
        records.append(PreferenceRecord(pool.prompts[pool.candidates[a].prompt][0], pool.candidates[better].text,
                                        pool.candidates[worse].text, user.user_id, user.text,
                                        scores[better], scores[worse], f"pool:{user.group}"))
    if len(records) < n:
        raise ValueError(f"the pool in {pool.folder} gives user {user.user_id} ({user.group}) only "
                         f"{len(records)} usable {split} pairs of {len(candidates)} candidate pairs"
                         f"{pool.floor_clause()}, "
                         f"{n} asked: lower data.{split}_pairs_per_user or give the pool more "
                         f"{split} prompts, system prompts or samples")
    return records


def real_pairs(cfg: RewardDataConfig) -> dict[int, UserPairs]:
    """One user's pairs from a real ratings file (quarantined rows go to a temp file)."""
    import hashlib
    import tempfile

    from raypref.data.loaders import load_validated

    if cfg.schema in PAIR_SCHEMAS:
        return own_pairs(cfg)
    if not Path(cfg.source).exists():
        raise FileNotFoundError(f"data.source={cfg.source!r}: no such file or folder")
    _, _, weights = RATINGS[cfg.schema]
    key = hashlib.sha256(f"{Path(cfg.source).resolve()}:{cfg.schema}".encode()).hexdigest()[:12]
    quarantine = Path(tempfile.gettempdir()) / "raypref-quarantine" / f"{cfg.schema}-{key}.jsonl"
    quarantine.parent.mkdir(parents=True, exist_ok=True)
    records, _ = load_validated(cfg.source, schema=cfg.schema, quarantine_path=quarantine,
                                max_quarantine_fraction=cfg.max_quarantine_fraction,
                                weights=weights, user_id=1)
    if len(records) <= cfg.test_pairs_per_user:
        raise ValueError(f"data.source={cfg.source!r}: {len(records)} valid pairs, need more "
                         f"than data.test_pairs_per_user={cfg.test_pairs_per_user}")
    order = np.random.default_rng(cfg.world_seed).permutation(len(records))
    shuffled = [records[i] for i in order]
    test, train = shuffled[:cfg.test_pairs_per_user], shuffled[cfg.test_pairs_per_user:]
    user = User(1, dict(weights), None, cfg.schema)
    return {1: UserPairs(user, train[:cfg.train_pairs_per_user], test)}


def own_pairs(cfg: RewardDataConfig) -> dict[int, UserPairs]:
    """Each user's pairs of a preference source (`PAIR_SCHEMAS`), shuffled by ``world_seed``:
    ``test_pairs_per_user`` held out, at most ``train_pairs_per_user`` to train. Users with no
    more than ``test_pairs_per_user + n_demos`` pairs are left out (and counted)."""
    import hashlib
    import tempfile

    from raypref.data.source import PreferenceSource, load_source

    src = PreferenceSource(source=cfg.source, format=cfg.schema, split=cfg.split, user_column=cfg.user_column)
    key = hashlib.sha256(f"{cfg.source}:{cfg.schema}:{cfg.split}:{cfg.user_column}".encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / "raypref-quarantine"
    folder.mkdir(parents=True, exist_ok=True)
    records, _ = load_source(src, quarantine_path=folder / f"{cfg.schema}-{key}.jsonl",
                             max_quarantine_fraction=cfg.max_quarantine_fraction, max_chars=20000,
                             user_ids_path=folder / f"{cfg.schema}-{key}-users.json")
    by_user: dict[int, list[PreferenceRecord]] = {}
    for record in records:  # no users: every pair is user 1's
        by_user.setdefault(record.user_id if src.has_users else 1, []).append(record)
    out, too_few = {}, []
    for user_id, pairs in sorted(by_user.items()):
        if len(pairs) <= cfg.test_pairs_per_user + cfg.n_demos:
            too_few.append(user_id)
            continue
        order = np.random.default_rng([cfg.world_seed, user_id]).permutation(len(pairs))
        shuffled = [pairs[i] for i in order]
        test, train = shuffled[:cfg.test_pairs_per_user], shuffled[cfg.test_pairs_per_user:]
        out[user_id] = UserPairs(User(user_id, {"preference": 1.0}, None, cfg.schema),
                                 train[:cfg.train_pairs_per_user], test)
    if too_few:
        print(f"[reward] data.source={cfg.source}: {len(too_few)} of {len(by_user)} users have at most "
              f"data.test_pairs_per_user + data.n_demos = {cfg.test_pairs_per_user + cfg.n_demos} pairs "
              f"and are left out", flush=True)
    if not out:
        raise ValueError(f"data.source={cfg.source!r}: no user has more than data.test_pairs_per_user + "
                         f"data.n_demos = {cfg.test_pairs_per_user + cfg.n_demos} valid pairs "
                         f"({len(records)} valid pairs in all)")
    return out


def attribute_targets(record_scores: dict[str, float], attributes) -> list[float]:
    """A response's ratings in ``attributes`` order, NaN where unrated, for regression."""
    return [float(record_scores.get(a, float("nan"))) for a in attributes]


def pair_embeddings(records: list[PreferenceRecord], encoder) -> torch.Tensor:
    """[n, 2, E]: frozen embeddings of each record's (prompt+chosen, prompt+rejected)."""
    from raypref.models.reward import embed_frozen

    prompts = [r.prompt for r in records]
    chosen = embed_frozen(encoder, prompts, [r.chosen for r in records])
    rejected = embed_frozen(encoder, prompts, [r.rejected for r in records])
    return torch.stack([chosen, rejected], dim=1)


def demo_embeddings(pairs: dict[int, UserPairs], demo_pool: int, encoder) -> dict[int, torch.Tensor]:
    """user id -> [demo_pool, 2, E]: the frozen embeddings of the user's demonstration pool."""
    return {uid: pair_embeddings(up.train[:demo_pool], encoder) for uid, up in pairs.items()}


def save_embeddings(embeddings: dict[int, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({str(uid): t.contiguous() for uid, t in embeddings.items()}, str(tmp))
    tmp.replace(path)


def load_embeddings(path: Path) -> dict[int, torch.Tensor]:
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(f"demonstration embeddings file {path} does not exist "
                                "(precompute it with recipes.reward.precompute_demo_embeddings)")
    return {int(k): v for k, v in load_file(str(path)).items()}


def judge_reference(cfg: RewardDataConfig, eval_pairs_per_user: int) -> dict[str, float]:
    """A reference for the evaluation pairs: the accuracy of the world's own judge read with each
    user's true weights (ties count half). At difficulty > 0 the text shows the aspects only weakly
    and labels flip, so it falls (0.68 at difficulty 0.5). Not an upper bound: the judge reads only
    the shown aspect markers, and a fine-tuned RM reached 0.97 / 0.92 where the judge reads 0.94 /
    0.885 (difficulty 0.1). On the pool the text judges label the pairs themselves, so the
    reference is 1 − label noise, up to chance."""
    if not cfg.has_judge:
        raise ValueError(f"judge_reference: data.source={cfg.source!r} has no world judge")
    if cfg.source == POOL:  # the records carry the text judges' (scaled) scores
        def judged(record, side):
            return getattr(record, f"{side}_scores")
    else:
        world = World.from_config(cfg)

        def judged(record, side):
            return world.judge(getattr(record, side), record.prompt)
    out = {}
    for user_id, up in sorted(build_pairs(cfg).items()):
        test = up.test[:eval_pairs_per_user]
        margins = np.array([up.user.utility(judged(r, "chosen")) - up.user.utility(judged(r, "rejected"))
                            for r in test])
        out[f"user{user_id}"] = float(((margins > 0) + 0.5 * (margins == 0)).mean())
    out["mean"] = float(np.mean(list(out.values())))
    out["min"] = float(min(v for k, v in out.items() if k.startswith("user")))
    return out
