"""One shared candidate pool of real text: answers sampled once from a base LM under varied system
prompts, cached on disk by a hash of its settings, judged by the text judges, and read by every
job that labels pairs from it (the reward comparison, the soups and the fronts jobs on real text).

    python jobs/pool.py --config configs/reward-compare-smollm2.yaml   # that job's data.pool
    python jobs/pool.py --max_new_tokens 48 --train_prompts 10 ...    # or flags

Settings (`PoolConfig`): the model, the prompts (the project's questions, data/prompts.py, or a
file; `train_prompts` / `test_prompts` of each split, spread over the file), the system prompts
("" = none; default: P-Soups Table 4's six preference texts and none), samples per prompt and
system prompt, max_new_tokens, temperature, seed and batch size. The folder
``<dir>/pool-<key>`` is keyed by a hash of all of them and of the model's files (so a changed
checkpoint never reuses old answers); the batch size is in the key because a batch's padding
and random stream shape its samples. ``min_quality`` is not: it is the labeller's floor, not the
pool's text. Answers judged below it never enter a pair of any job that reads the pool (counted
in the log), because a judge that orders by words or reading grade alone would otherwise prefer
a small model's word salad for being short or simple (docs/RESULTS.md).

Generation walks the (prompt, system prompt, sample) items in prompt order in batches; each
finished batch is appended to ``partial.jsonl`` as one fsynced line, with a progress line
(tokens/s, ETA). A killed run resumes with the first missing batch (a torn last line is
dropped); the complete pool is then written atomically to ``pool.jsonl`` and ``partial.jsonl``
removed. The judges' scores go to ``scores.json`` (atomic), keyed by the judges' names.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from raypref import atomic
from raypref.config import check_fields, config_hash
from raypref.data.prompts import read_prompts
from raypref.data.users import psoups_profiles

POOL_FILE, PARTIAL_FILE, SCORES_FILE, SETTINGS_FILE = "pool.jsonl", "partial.jsonl", "scores.json", "settings.json"
JUDGES = ("verbosity", "expertise", "friendliness", "relevance", "repetition", "fluency")
NO_SYSTEM = ""


def default_systems() -> list[str]:
    """No system prompt, then P-Soups Table 4's six preference texts (elementary / PhD, concise /
    informative, friendly / unfriendly): the candidates spread over every judged dimension."""
    return [NO_SYSTEM] + [p.prompt for p in psoups_profiles()]


@dataclass
class PoolConfig:
    model: str = "smollm2-135m-instruct"  # a named model (models/factory.py) or a local folder
    prompts: str = ""             # prompts file (.jsonl / .txt); "" = the project's questions
    train_prompts: int = 0        # how many train-split prompts, spread over the file; 0 = all
    test_prompts: int = 0         # the same for the test split
    systems: list[str] = field(default_factory=default_systems)  # "" = no system message
    samples_per_prompt: int = 1   # per prompt and system prompt
    max_new_tokens: int = 96
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 16
    judges: list[str] = field(default_factory=lambda: list(JUDGES))  # scored once into scores.json
    # torch CPU threads while generating and judging; 0 = torch's default. Not in the key. On a
    # shared 2-core machine 1 thread sampled 7.5x faster than 2 (60 vs 8 tokens/s, batch 14)
    threads: int = 0
    # answers judged below this general quality (0..1) never enter a pair, so no label prefers
    # word salad for being short or simple; left out, counted in the log. Not in the key
    min_quality: float = 0.0
    dir: str = "outputs/pools"

    def validate(self) -> None:
        check_fields("PoolConfig", self, [
            ("train_prompts", self.train_prompts >= 0, "must be >= 0 (0 = all)"),
            ("test_prompts", self.test_prompts >= 0, "must be >= 0 (0 = all)"),
            ("systems", bool(self.systems) and len(set(self.systems)) == len(self.systems),
             "must be distinct and not empty"),
            ("samples_per_prompt", self.samples_per_prompt >= 1, "must be >= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature > 0, "must be > 0 (the pool is sampled)"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("threads", self.threads >= 0, "must be >= 0 (0 = torch's default)"),
            ("judges", bool(self.judges) and set(self.judges) <= set(JUDGES)
             and len(set(self.judges)) == len(self.judges), f"must be distinct names of {JUDGES}"),
            ("min_quality", 0.0 <= self.min_quality <= 1.0, "must be in 0..1 (0 = every answer pairs)"),
            ("min_quality", self.min_quality == 0.0 or {"relevance", "repetition"} <= set(self.judges),
             "needs the relevance and repetition judges (quality is judged from them)"),
        ])


@dataclass(frozen=True)
class Candidate:
    prompt: int     # index into Pool.prompts
    system: int     # index into Pool.systems
    sample: int
    text: str
    tokens: int     # new tokens generated (the eos included when it came)


@dataclass
class Pool:
    prompts: list[tuple[str, str]]  # (text, split)
    systems: list[str]
    candidates: list[Candidate]
    folder: Path
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # judge -> [len(candidates)]
    min_quality: float = 0.0  # PoolConfig.min_quality: the floor for entering a pair

    def below_floor(self) -> np.ndarray:
        """bool [len(candidates)]: the answers judged below ``min_quality``, kept out of pairs."""
        if self.min_quality <= 0.0:
            return np.zeros(len(self.candidates), dtype=bool)
        if "quality" not in self.scores:
            raise ValueError(f"pool {self.folder}: min_quality={self.min_quality} needs the pool's "
                             f"quality scores, and it has {sorted(self.scores) or 'none'}")
        return np.asarray(self.scores["quality"]) < self.min_quality

    def by_prompt(self, split: str) -> dict[int, list[int]]:
        """prompt index -> indices of its candidates that may pair (at or above the quality
        floor), for the prompts of ``split``."""
        below = self.below_floor()
        out: dict[int, list[int]] = {}
        for i, c in enumerate(self.candidates):
            if self.prompts[c.prompt][1] == split and not below[i]:
                out.setdefault(c.prompt, []).append(i)
        return out

    def floor_clause(self) -> str:
        """", both at or above the quality floor X (pool.min_quality)" when a floor is set: for
        errors about too few pairs, so a user sees the floor may be what left too few."""
        return (f", both at or above the quality floor {self.min_quality:g} (pool.min_quality)"
                if self.min_quality > 0 else "")

    def floor_line(self) -> str:
        """What the quality floor leaves out, per split, for the log."""
        below = self.below_floor()
        counts = {split: (sum(below[i] for i, c in enumerate(self.candidates) if self.prompts[c.prompt][1] == split),
                          sum(self.prompts[c.prompt][1] == split for c in self.candidates))
                  for split in ("train", "test")}
        return (f"[pool] quality floor {self.min_quality:g}: "
                + ", ".join(f"{n} of {total} {split} answers" for split, (n, total) in counts.items())
                + " left out of pairs")


# ---------------------------------------------------------------- settings and key

def pool_prompts(cfg: PoolConfig) -> list[tuple[str, str]]:
    """(text, split) of the chosen prompts: ``train_prompts`` of the train split then
    ``test_prompts`` of the test split, each spread evenly over its split in file order (the
    project's questions come topic by topic, so the first n would be a few topics)."""
    prompts = read_prompts(cfg.prompts or None)
    out = []
    for split, n in (("train", cfg.train_prompts), ("test", cfg.test_prompts)):
        texts = [p.text for p in prompts if p.split == split]
        if n > len(texts):
            raise ValueError(f"pool.{split}_prompts={n}: the prompts file has only {len(texts)} "
                             f"{split} prompts")
        picked = texts if n == 0 else [texts[i * len(texts) // n] for i in range(n)]
        out += [(t, split) for t in picked]
    if not any(s == "test" for _, s in out) or not any(s == "train" for _, s in out):
        raise ValueError("pool: the prompts must have both a train and a test split")
    return out


def model_fingerprint(model: str) -> str:
    """sha256 over every file of the model's folder (weights, tokenizer, chat template); a hub id
    that is not a local folder is fingerprinted by its name alone."""
    from raypref.models.factory import _file_sha256, resolve_model  # hashed once per file version

    folder = Path(resolve_model(model)).expanduser()
    if not folder.is_dir():
        return f"name:{model}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0".encode())
        digest.update(_file_sha256(str(path), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()


def generation_settings(cfg: PoolConfig) -> dict:
    """Everything the pool's text depends on (its cache key hashes this)."""
    return {"model": Path(cfg.model).name, "model_sha256": model_fingerprint(cfg.model),
            "prompts": pool_prompts(cfg), "systems": list(cfg.systems),
            "samples_per_prompt": cfg.samples_per_prompt, "max_new_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature, "seed": cfg.seed, "batch_size": cfg.batch_size}


def resolved(cfg: PoolConfig) -> PoolConfig:
    """``cfg`` with its relative paths (dir, prompts, a local model folder) made absolute against
    this working directory: what a driver hands its workers, which run in other folders."""
    model = Path(cfg.model).expanduser()
    return dataclasses.replace(
        cfg, dir=str(Path(cfg.dir).expanduser().resolve()),
        prompts=str(Path(cfg.prompts).expanduser().resolve()) if cfg.prompts else "",
        model=str(model.resolve()) if model.exists() else cfg.model)


def pool_folder(cfg: PoolConfig, settings: dict | None = None) -> Path:
    return Path(cfg.dir) / f"pool-{config_hash(settings or generation_settings(cfg), 16)}"


# ---------------------------------------------------------------- generation

# (prompts, systems or None each, seed) -> [(text, new tokens)]
GenerateFn = Callable[[list[str], list[str | None], int], list[tuple[str, int]]]


def lm_generate_fn(cfg: PoolConfig) -> GenerateFn:
    """Batched sampling from ``cfg.model`` (models/factory.py ``generate_ids``)."""
    from raypref.models.factory import generate_ids, load_pretrained

    model, tokenizer = load_pretrained(cfg.model)

    def generate(prompts, systems, seed):
        ids = generate_ids(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, greedy=False,
                           temperature=cfg.temperature, seed=seed, system=systems)
        return [(tokenizer.decode(seq, skip_special_tokens=True).strip(), len(seq)) for seq in ids]
    return generate


def _items(settings: dict) -> list[tuple[int, int, int]]:
    """(prompt, system, sample) in prompt order: a killed run has whole prompts done first."""
    return [(p, s, k) for p in range(len(settings["prompts"])) for s in range(len(settings["systems"]))
            for k in range(settings["samples_per_prompt"])]


def _read_partial(path: Path) -> dict[int, list[dict]]:
    """batch -> rows of the finished batches; a torn last line (a kill mid-write) is cut off."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    done, good = {}, 0
    for n, line in enumerate(lines):
        if not line.strip():
            good += len(line) + 1
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[n + 1:]):
                raise ValueError(f"{path}:{n + 1}: a broken line before the last one; delete the "
                                 "file to generate the pool again") from None
            break  # the torn tail of a killed write
        done[int(row["batch"])] = row["rows"]
        good += len(line) + 1
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(min(good, len(raw)))
    return done


def generate_pool(cfg: PoolConfig, generate_fn: GenerateFn | None = None, log=print) -> Pool:
    """The pool of ``cfg``: read from its folder if complete, else generated (resuming the
    finished batches of an interrupted run) and written there."""
    cfg.validate()
    settings = generation_settings(cfg)
    folder = pool_folder(cfg, settings)
    if (folder / POOL_FILE).exists():
        return load_pool(cfg, settings)
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_json(folder / SETTINGS_FILE, settings, indent=1)
    items = _items(settings)
    batches = [items[i:i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    partial = folder / PARTIAL_FILE
    done = _read_partial(partial)
    todo = [b for b in range(len(batches)) if b not in done]
    if done:
        log(f"[pool] resuming {folder}: {len(done)} of {len(batches)} batches done")
    if todo:
        generate_fn = generate_fn or lm_generate_fn(cfg)
    start, tokens = time.perf_counter(), 0
    with open(partial, "a", encoding="utf-8") as out:
        for n, b in enumerate(todo, 1):
            batch = batches[b]
            prompts = [settings["prompts"][p][0] for p, _, _ in batch]
            systems = [settings["systems"][s] or None for _, s, _ in batch]
            texts = generate_fn(prompts, systems, cfg.seed * 1_000_003 + b)
            if len(texts) != len(batch):
                raise RuntimeError(f"pool: the generator gave {len(texts)} answers for {len(batch)} prompts")
            rows = [{"prompt": p, "system": s, "sample": k, "text": t, "tokens": int(m)}
                    for (p, s, k), (t, m) in zip(batch, texts)]
            out.write(json.dumps({"batch": b, "rows": rows}) + "\n")
            out.flush()
            os.fsync(out.fileno())
            done[b] = rows
            tokens += sum(r["tokens"] for r in rows)
            elapsed = time.perf_counter() - start
            rate = tokens / elapsed if elapsed > 0 else float("nan")
            eta = elapsed / n * (len(todo) - n)
            log(f"[pool] batch {len(done)}/{len(batches)} (prompt {batch[-1][0] + 1}/"
                f"{len(settings['prompts'])}): {tokens} tokens in {elapsed:.0f} s, {rate:.1f} tokens/s, "
                f"ETA {eta / 60:.1f} min", flush=True)
    rows = [row for b in range(len(batches)) for row in done[b]]
    atomic.write_text(folder / POOL_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    partial.unlink(missing_ok=True)
    return load_pool(cfg, settings)


def load_pool(cfg: PoolConfig, settings: dict | None = None) -> Pool:
    """The complete pool of ``cfg`` (with its scores, if judged); a clear error if it was never
    generated, so workers never start a generation of their own."""
    settings = settings or generation_settings(cfg)
    folder = pool_folder(cfg, settings)
    path = folder / POOL_FILE
    if not path.exists():
        raise FileNotFoundError(f"no candidate pool at {path}: generate it first with "
                                f"`python jobs/pool.py` and the same pool settings")
    candidates = [Candidate(**json.loads(line)) for line in path.read_text(encoding="utf-8").splitlines()]
    pool = Pool([tuple(p) for p in settings["prompts"]], list(settings["systems"]), candidates, folder,
                min_quality=cfg.min_quality)
    scores_path = folder / SCORES_FILE
    if scores_path.exists():
        saved = json.loads(scores_path.read_text())
        if saved["judges"] == list(cfg.judges):
            pool.scores = {k: np.asarray(v, dtype=np.float64) for k, v in saved["scores"].items()}
    return pool


# ---------------------------------------------------------------- judging

def judge_panel(names: Sequence[str], lm=None):
    """A `TextJudges` panel of ``names`` (fluency needs ``lm``: (model, tokenizer))."""
    from raypref.rewards.text import (Expertise, Fluency, Friendliness, Relevance, Repetition,
                                      TextJudges, Verbosity)

    make = {"verbosity": Verbosity, "expertise": Expertise, "friendliness": Friendliness,
            "relevance": Relevance, "repetition": Repetition, "fluency": lambda: Fluency(*lm)}
    if "fluency" in names and lm is None:
        raise ValueError("judge_panel: the fluency judge needs the LM (lm=(model, tokenizer))")
    return TextJudges([make[n]() for n in names])


def score_pool(cfg: PoolConfig, pool: Pool, log=print) -> Pool:
    """Every candidate judged (on its bare prompt) by ``cfg.judges``, once; saved to scores.json."""
    if pool.scores:
        return pool
    lm = None
    if "fluency" in cfg.judges:
        from raypref.models.factory import load_pretrained

        lm = load_pretrained(cfg.model)
    start = time.perf_counter()
    prompts = [pool.prompts[c.prompt][0] for c in pool.candidates]
    scores = judge_panel(cfg.judges, lm).score(prompts, [c.text for c in pool.candidates])
    log(f"[pool] judged {len(prompts)} answers by {list(scores)} in {time.perf_counter() - start:.0f} s",
        flush=True)
    atomic.write_json(pool.folder / SCORES_FILE, {"judges": list(cfg.judges),
                                                  "scores": {k: v.tolist() for k, v in scores.items()}})
    pool.scores = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    return pool


def ensure_pool(cfg: PoolConfig, generate_fn: GenerateFn | None = None, log=print) -> Pool:
    """Generated (or resumed, or read) and judged: what a job's driver calls before its workers."""
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        pool = score_pool(cfg, generate_pool(cfg, generate_fn, log), log)
    finally:
        torch.set_num_threads(threads)
    if pool.min_quality > 0:
        log(pool.floor_line(), flush=True)
    return pool


def summary(pool: Pool, cfg: PoolConfig) -> dict:
    """Sizes, mean tokens and the share cut at max_new_tokens per system prompt, the judges'
    means per system prompt and their Spearman correlations on the pool."""
    from raypref.rewards.text import judge_correlations

    def per_system(value):
        return {pool.systems[s] or "(none)": float(np.mean([value(c) for c in pool.candidates if c.system == s]))
                for s in range(len(pool.systems))}
    out = {"candidates": len(pool.candidates),
           "prompts": {s: sum(1 for _, sp in pool.prompts if sp == s) for s in ("train", "test")},
           "mean_tokens_by_system": per_system(lambda c: c.tokens),
           "cut_at_max_new_tokens_by_system": per_system(lambda c: c.tokens >= cfg.max_new_tokens)}
    if pool.scores:
        out["mean_scores_by_system"] = {pool.systems[s] or "(none)": {k: float(np.mean(
            [v[i] for i, c in enumerate(pool.candidates) if c.system == s])) for k, v in pool.scores.items()}
            for s in range(len(pool.systems))}
        out["spearman"] = judge_correlations(pool.scores).round(3).to_dict()
    return out


# ---------------------------------------------------------------- pairs for the P-Soups labelling path

@dataclass(frozen=True)
class PoolAnswer:
    """A pool candidate as `data.labelling` reads a world's response: its text and its P-Soups
    attributes (``latent``, on `data.labelling.ATTRIBUTE_RANGES`) from the text judges."""
    text: str
    latent: dict


@dataclass(frozen=True)
class PoolLabelling:
    """What `data.labelling` reads of a world, for pairs drawn from a pool: the annotators' label
    noise, and a combination's instruction (P-Soups Table 4's sentences)."""
    label_noise: float

    def preference_instruction(self, names: Sequence[str]) -> str:
        from raypref.data.labelling import COMBINATION_SEP, combination_instruction

        return combination_instruction(COMBINATION_SEP.join(names))


def psoups_latents(pool: Pool) -> list[dict[str, float]]:
    """Each candidate's P-Soups attributes from the pool's judges: expertise (reading grade),
    verbosity (words) and style (friendliness) as the candidate's percentile on the pool, on the
    world's ranges (0..1; style −1..1). One preference orders a pair as its judge does; P-MORL's
    mean over a combination weighs the three dimensions alike (raw grades, words and sentiment
    differ in scale by 100x)."""
    import pandas as pd

    from raypref.data.labelling import ATTRIBUTE_RANGES
    from raypref.data.users import TEXT_ATTRIBUTES, psoups_profiles, text_attribute

    missing = sorted(set(TEXT_ATTRIBUTES.values()) - set(pool.scores))
    if missing:
        raise ValueError(f"the pool in {pool.folder} has no scores of {missing}: judge it with "
                         f"`python jobs/pool.py` and judges including {sorted(TEXT_ATTRIBUTES.values())}")
    n = len(pool.candidates)
    # ties share their mean rank: equal scores stay equal (a tie is decided by the labelling's coin)
    unit = {judge: (pd.Series(pool.scores[judge]).rank(method="average").to_numpy() - 1.0) / max(n - 1, 1)
            for judge in TEXT_ATTRIBUTES.values()}
    judge_of = {p.attribute: text_attribute(p.name) for p in psoups_profiles()}  # style -> friendliness
    out = []
    for i in range(n):
        row = {}
        for attribute, judge in judge_of.items():
            lo, hi = ATTRIBUTE_RANGES[attribute]
            row[attribute] = float(lo + (hi - lo) * unit[judge][i])
        out.append(row)
    return out


def pair_indices(pool: Pool, n: int, seed, split: str = "train") -> list[tuple[int, int]]:
    """``n`` distinct pairs of candidate indices: two answers to one prompt of ``split`` (under
    different system prompts, or two samples), drawn without replacement in an order fixed by
    ``seed``; the same for every arm (and every job) that reads them."""
    from itertools import combinations

    possible = [pair for idx in pool.by_prompt(split).values() for pair in combinations(idx, 2)]
    if n > len(possible):
        raise ValueError(f"the pool in {pool.folder} has {len(possible)} {split} pairs (two answers "
                         f"to one prompt{pool.floor_clause()}), {n} asked: lower the pair budget or "
                         f"give the pool more {split} prompts, system prompts or samples")
    order = np.random.default_rng(np.random.SeedSequence(seed)).permutation(len(possible))[:n]
    return [possible[k] for k in order]


def candidate_pairs(pool: Pool, n: int, seed, split: str = "train") -> list:
    """`pair_indices` as unlabelled pairs (`data.labelling.CandidatePair`) whose answers carry
    their P-Soups attributes (`psoups_latents`), for the labelling path."""
    from raypref.data.labelling import CandidatePair

    latents = psoups_latents(pool)
    pairs = []
    for a, b in pair_indices(pool, n, seed, split):
        answer = [PoolAnswer(pool.candidates[i].text, latents[i]) for i in (a, b)]
        pairs.append(CandidatePair(pool.prompts[pool.candidates[a].prompt][0], answer[0], answer[1]))
    return pairs
