"""Each training seed's preference pairs, from one labelling path for every arm (P-Soups §2).

Simulated world: one set of candidate pairs per seed (train-split prompts) and one of
held-out pairs (test-split prompts); each P-Soups preference labels the same candidates, and
P-MORL labels them too, pair i by combination i % k with its instruction in the prompt. The
arms differ only in who labels. Real text: the same from the shared candidate pool, labelled
by the text judges (`pool_data`). Real data: each preference's P-Soups file, validated.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from raypref.data.labelling import (
    LabelStats,
    candidate_pairs,
    combination_labelled_pairs,
    label_pairs,
    preference_labeller,
)
from raypref.data.loaders import load_validated
from raypref.data.records import PreferenceRecord
from raypref.data.users import preference_table, psoups_profile, psoups_profiles  # noqa: F401


@dataclass
class SeedData:
    """The pairs of one training seed."""
    train: dict[str, list[PreferenceRecord]]
    held_out: dict[str, list[PreferenceRecord]]
    pmorl: list[PreferenceRecord] | None = None
    stats: dict[str, LabelStats] = field(default_factory=dict)
    # P-MORL's system text rule (recipes.dpo.SYSTEM_TEXTS): "combination" when its prompts are
    # bare and each pair's combination instruction goes in the chat template's system message
    pmorl_system: str = ""


def _user_id(name: str) -> int:
    """A preference's user id, stable whatever subset of preferences a config trains."""
    return 1 + [p.name for p in psoups_profiles(extended=True)].index(name)


def simulated_data(cfg, world, seed: int, system_message: bool = False) -> SeedData:
    """Pairs of every preference (and P-MORL) of one seed from the same candidates.
    ``system_message``: the policy has a chat template, so P-MORL's instruction goes in the
    system message (P-Soups Table 4's sentences, as at evaluation), not after the prompt;
    every per-preference method (DPO, IPO, ORPO, PPO) reads it there."""
    n = cfg.pairs_per_preference
    return _labelled_data(cfg, world, candidate_pairs(world, n, [seed, 0]),
                          candidate_pairs(world, max(1, n // 10), [seed, 1], split="test"),
                          seed, system_message, "world")


def pool_data(cfg, pool, seed: int, system_message: bool = True) -> SeedData:
    """Pairs of every preference (and P-MORL) of one seed from the shared candidate pool of real
    text (`recipes.pool`): one set of candidate pairs (two answers to one train prompt) labelled
    by each preference's text judge, and by P-MORL's combinations, with the same label noise
    ``cfg.label_noise`` and the same noise draws; held-out pairs from the test prompts. As in
    `simulated_data`, only who labels differs between the arms."""
    from raypref.recipes.pool import PoolLabelling, candidate_pairs as pool_pairs

    n = cfg.pairs_per_preference
    return _labelled_data(cfg, PoolLabelling(cfg.label_noise), pool_pairs(pool, n, [seed, 0], "train"),
                          pool_pairs(pool, max(1, n // 10), [seed, 1], "test"), seed, system_message, "pool")


def _labelled_data(cfg, world, train_pairs, held_pairs, seed: int, system_message: bool,
                   origin: str) -> SeedData:
    """Each preference labels ``train_pairs`` and ``held_pairs`` (``world`` gives the label noise),
    P-MORL the train pairs by combination; ``origin`` names the source ("world", "pool")."""
    data = SeedData({}, {})
    for name in cfg.preferences:
        labeller = preference_labeller([name])
        kwargs = dict(user_id=_user_id(name), user_text=psoups_profile(name).instruction,
                      source=f"{origin}:psoups:{name}")
        data.stats[name] = LabelStats()
        data.train[name] = label_pairs(world, train_pairs, labeller, [seed, 0],
                                       stats=data.stats[name], **kwargs)
        data.held_out[name] = label_pairs(world, held_pairs, labeller, [seed, 1], **kwargs)
    if "pmorl" in cfg.baselines:
        data.stats["P-MORL"] = LabelStats()
        data.pmorl = combination_labelled_pairs(world, train_pairs, cfg.combinations, [seed, 0],
                                                instruction_in_prompt=not system_message,
                                                source=f"{origin}:pmorl", stats=data.stats["P-MORL"])
        data.pmorl_system = "combination" if system_message else ""
    return data


def file_data(cfg, log=print) -> SeedData:
    """Pairs of every preference from its file (P-Soups' layout, or TRL's with psoups_format
    trl): every row validated, bad rows quarantined with file and line, too many stop the job
    (wrong columns: one error at once); the last 10% are held out. A TRL file's pairs become
    the preference's as a P-Soups file's do (its user id, its name as user text)."""
    data = SeedData({}, {})
    for name in cfg.preferences:
        if name not in cfg.psoups_files:
            raise ValueError(f"psoups_files has no file for preference {name!r}; "
                             f"it has {sorted(cfg.psoups_files)}")
        options = {"preference": name} if cfg.psoups_format == "psoups" else {}
        records, summary = load_validated(
            cfg.psoups_files[name], schema=cfg.psoups_format, split=cfg.psoups_split or None,
            quarantine_path=Path(cfg.output_dir).resolve() / "quarantine" / f"{name}.jsonl",
            max_quarantine_fraction=cfg.max_quarantine_fraction, **options)
        if cfg.psoups_format != "psoups":
            records = [replace(r, user_id=_user_id(name), user_text=name, source=f"{cfg.psoups_format}:{name}")
                       for r in records]
        log(f"    {name}: {summary['rows_valid']}/{summary['rows_total']} rows valid, "
            f"{summary['rows_quarantined']} quarantined {summary['by_reason']} -> {summary['path']}")
        if len(records) < 2:
            raise ValueError(f"psoups_files.{name}={cfg.psoups_files[name]}: {len(records)} valid "
                             "pairs, at least 2 are needed (train + held-out)")
        cut = max(1, len(records) // 10)
        data.train[name], data.held_out[name] = records[:-cut], records[-cut:]
        # each worker needs a whole micro-batch: say so here, not from inside a training run
        per_step = cfg.training.micro_batch_size * cfg.resources.num_workers
        if len(data.train[name]) < per_step:
            raise ValueError(f"psoups_files.{name}={cfg.psoups_files[name]}: {len(data.train[name])} "
                             f"training pairs (after {cut} held out), fewer than one step's "
                             f"training.micro_batch_size={cfg.training.micro_batch_size} x "
                             f"resources.num_workers={cfg.resources.num_workers}")
    return data


def preference_data(cfg, world, seed: int, log=print) -> SeedData:
    """One seed's pairs: from the P-Soups files when the config names them, else simulated."""
    return file_data(cfg, log) if cfg.psoups_files else simulated_data(cfg, world, seed)
