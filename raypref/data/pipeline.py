"""Ray Data pipeline: preference shards -> validated rows -> fixed-length DPO tensors.

`read_preference_shards` lists the `*.parquet` / `*.jsonl` / `*.jsonl.gz` shards under a
local folder or a pyarrow filesystem URI and validates them in Ray tasks, one shard per
task, streaming: bad rows, undecodable lines and the unreadable part of a corrupt shard
go to a `Quarantine` running as a small actor on the driver's node (it owns the
quarantine file and the counts; see quarantine.py for how an unreadable shard counts),
valid rows flow on in the `to_row()` schema. Nothing is materialized whole in the driver.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow.fs as pafs
import ray
from ray.data import ActorPoolStrategy, Dataset
from ray.train import DataConfig
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pathlib import Path

from raypref.data.loaders import Schema, check_columns, file_columns, read_shard
from raypref.data.quarantine import UNREADABLE_SHARD, Quarantine, check_fraction, make_entry
from raypref.data.records import InvalidRecord, validate_row

SHARD_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")


def list_shards(uri: str, suffixes: tuple[str, ...] = SHARD_SUFFIXES) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem of `uri` (a local path or e.g. `file:///…`, `s3://…`) and the sorted
    shard paths under it (or the file itself) ending with one of `suffixes`."""
    unknown = sorted(set(suffixes) - set(SHARD_SUFFIXES))
    if not suffixes or unknown:
        raise ValueError(f"shard suffixes must be a non-empty subset of {SHARD_SUFFIXES}, got {suffixes}")
    if "://" in uri:
        filesystem, base = pafs.FileSystem.from_uri(uri)
    else:
        filesystem, base = pafs.LocalFileSystem(), os.path.abspath(uri)
    info = filesystem.get_file_info(base)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such shard folder or file: {uri}")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    shards = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(tuple(suffixes)))
    if not shards:
        raise FileNotFoundError(f"no {' or '.join('*' + x for x in suffixes)} shards under {uri}")
    return filesystem, shards


# The columns of a shard (`PreferenceRecord.to_row`); other layouts are read by the loaders
SHARD_COLUMNS = Schema(
    "preference shards", lambda **options: None,
    columns=lambda sample, options: ("prompt", "chosen", "rejected"),
    columns_hint="'prompt', 'chosen', 'rejected' as text, optional 'user_id', 'user_text', 'chosen_scores', "
                 "'rejected_scores', 'source', 'context' (PreferenceRecord.to_row); other layouts (TRL "
                 "conversations, PRISM, ...) go through a job's data.source")


def check_shard_columns(filesystem: pafs.FileSystem, shards: list[str]) -> None:
    """One `WrongColumns` naming the first local shard without the shard columns, before any
    row is read (remote shards: their rows are quarantined as they are read)."""
    if isinstance(filesystem, pafs.LocalFileSystem):
        for shard in shards:
            check_columns(shard, *file_columns(Path(shard)), SHARD_COLUMNS, {})


# Entries one shard task holds until its end (each at most ~MAX_RAW_CHARS): past that it
# only counts them, so a shard of bad rows cannot fill the task's memory.
MAX_ENTRIES_PER_SHARD = 1000


def _validate_shard(item: dict, *, filesystem: pafs.FileSystem, quarantine, max_chars: int) -> Iterator[dict]:
    """flat_map step: yield the valid rows of one shard; report the rest once, at its end.

    `read_shard` turns a shard that cannot be read (or its unreadable rest) into one
    InvalidRecord, and `validate_row` raises nothing else, so the task always reaches
    `finish_shard` and the counts stay whole.
    """
    shard, rows_valid, entries, omitted = item["shard"], 0, [], Counter()
    for line, row, raw in read_shard(shard, lambda: filesystem.open_input_file(shard)):
        try:
            if isinstance(row, InvalidRecord):
                raise row
            record = validate_row(row, max_chars=max_chars)
        except InvalidRecord as err:
            if len(entries) < MAX_ENTRIES_PER_SHARD or err.code == UNREADABLE_SHARD:  # bad_shards needs it
                entries.append(make_entry(reason=err.code, detail=err.detail, shard=shard, line=line, raw=raw))
            else:
                omitted[err.code] += 1
            continue
        rows_valid += 1
        yield record.to_row()
    # One call per shard: the actor ignores a shard it has already counted, so a retried
    # task or a second pass over the lazy dataset does not count twice.
    ray.get(quarantine.finish_shard.remote(shard, rows_valid, entries, dict(omitted)))


class QuarantineReport:
    """Driver-side handle on the quarantine actor: counts so far, and the fraction check."""

    def __init__(self, actor, max_fraction: float, path: str):
        self._actor = actor
        self.max_fraction = max_fraction
        self.path = path

    def summary(self) -> dict:
        """As `Quarantine.summary`: row counts, `by_reason`, `shards_total`, `bad_shards`, `path`."""
        return ray.get(self._actor.summary.remote())

    def check(self) -> dict:
        """Call after consuming the dataset: the summary, or `QuarantineExceeded`."""
        return check_fraction(self.summary(), self.max_fraction)


def read_preference_shards(uri: str, *, quarantine_path: str, max_quarantine_fraction: float = 0.05,
                           max_chars: int = 20000, num_cpus: float = 1.0,
                           suffixes: tuple[str, ...] = SHARD_SUFFIXES) -> tuple[Dataset, QuarantineReport]:
    """Dataset of valid rows (`to_row()` columns) from every shard under `uri` whose name ends
    with one of `suffixes` (e.g. only `(".parquet",)` where each shard is also written as jsonl).

    Validation runs lazily in Ray tasks (`num_cpus` each, one shard per task); invalid rows
    go to `quarantine_path` (jsonl, on the driver's node). Consume the dataset, then call
    `report.check()` to apply `max_quarantine_fraction`.
    """
    filesystem, shards = list_shards(uri, suffixes)
    check_shard_columns(filesystem, shards)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(Quarantine).options(num_cpus=0, scheduling_strategy=here).remote(
        quarantine_path, max_fraction=max_quarantine_fraction)
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    ds = ds.flat_map(_validate_shard, num_cpus=num_cpus,
                     fn_kwargs=dict(filesystem=filesystem, quarantine=actor, max_chars=max_chars))
    return ds, QuarantineReport(actor, max_quarantine_fraction, str(quarantine_path))


# ---------------------------------------------------------------- tokenization

class PairTokenizer:
    """map_batches callable: prompt + chosen / rejected -> fixed-length token tensors.

    Per side: `{side}_input_ids`, `{side}_attention_mask`, `{side}_labels_mask` (1 on
    response tokens only), all int64 of shape (batch, max_length), right-padded. Long
    pairs keep the end of the prompt (the same tokens for both sides, so both responses
    answer the same context) and the start of each response; an EOS closes a response.

    `encode`, if given, replaces that raw-text rule with a policy's own text format: a
    picklable `(tokenizer, prompt, response, max_length) -> (ids, n_prompt_ids)` such as
    `models.factory.encode_example`, applied to each side, so the tensors hold exactly the
    tokens the policy was trained and is evaluated on. Its prompt is the row's conversation
    (`context`, decoded) where it has one, as `PreferenceRecord.prompt_or_context`; the
    raw-text rule reads the prompt text (the conversation's transcript).
    """

    def __init__(self, tokenizer_factory: Callable[[], object], max_length: int,
                 encode: Callable[..., tuple[list[int], int]] | None = None):
        self.tokenizer = tokenizer_factory()  # once per actor, not per batch
        self.max_length = max_length
        self.encode = encode
        if self.tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; set tokenizer.pad_token")
        self.eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]

    def _ids(self, texts) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        length = self.max_length
        out = {f"{side}_{name}": np.full((len(batch["prompt"]), length), fill, dtype=np.int64)
               for side in ("chosen", "rejected")
               for name, fill in (("input_ids", self.tokenizer.pad_token_id), ("attention_mask", 0),
                                  ("labels_mask", 0))}
        if self.encode is not None:
            self._encode_with_format(batch, out)
            out["user_id"] = np.asarray(batch["user_id"], dtype=np.int64)
            return out
        prompts, chosen, rejected = (self._ids(batch[c]) for c in ("prompt", "chosen", "rejected"))
        for i, prompt in enumerate(prompts):
            responses = {"chosen": chosen[i] + self.eos, "rejected": rejected[i] + self.eos}
            # leave room for the longer response, but never less than half for the prompt
            budget = max(length - max(map(len, responses.values())), length // 2)
            kept_prompt = prompt[-budget:]
            for side, response in responses.items():
                response = response[: length - len(kept_prompt)]
                ids = kept_prompt + response
                out[f"{side}_input_ids"][i, : len(ids)] = ids
                out[f"{side}_attention_mask"][i, : len(ids)] = 1
                out[f"{side}_labels_mask"][i, len(kept_prompt): len(ids)] = 1
        out["user_id"] = np.asarray(batch["user_id"], dtype=np.int64)
        return out

    def _encode_with_format(self, batch: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> None:
        # rows of a shard written before the context column have none
        contexts = batch["context"] if "context" in batch else [""] * len(batch["prompt"])
        for i, (prompt, context) in enumerate(zip(batch["prompt"], contexts)):
            asked = json.loads(context) if context else str(prompt)
            for side in ("chosen", "rejected"):
                ids, n_prompt = self.encode(self.tokenizer, asked, str(batch[side][i]), self.max_length)
                if len(ids) > self.max_length:
                    raise ValueError(f"encode returned {len(ids)} tokens > max_length={self.max_length}")
                out[f"{side}_input_ids"][i, : len(ids)] = ids
                out[f"{side}_attention_mask"][i, : len(ids)] = 1
                out[f"{side}_labels_mask"][i, n_prompt: len(ids)] = 1


def tokenize_pairs(ds: Dataset, tokenizer_factory: Callable[[], object], max_length: int, *,
                   num_actors: int = 1, num_cpus: float = 1.0, batch_size: int = 64,
                   encode: Callable[..., tuple[list[int], int]] | None = None) -> Dataset:
    """Tokenize validated rows for DPO with a pool of `num_actors` tokenizer actors.

    `tokenizer_factory` is a picklable zero-argument callable returning a HF tokenizer;
    `encode` as in `PairTokenizer` (None: the raw-text rule).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    return ds.map_batches(
        PairTokenizer, fn_constructor_kwargs=dict(tokenizer_factory=tokenizer_factory, max_length=max_length,
                                                  encode=encode),
        compute=ActorPoolStrategy(size=num_actors), num_cpus=num_cpus, batch_size=batch_size,
        batch_format="numpy")


# ---------------------------------------------------------------- Train ingest

class ExactSplitDataConfig(DataConfig):
    """Like Ray Train's DataConfig, but splits datasets with `equal=False`.

    The default (`streaming_split(..., equal=True)`) drops rows so every worker sees the
    same count; here every row reaches exactly one worker, and counts may differ by a few.
    Mirrors `DataConfig.configure` of Ray 2.60 with only that flag changed.
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        to_split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            if name in to_split:
                for rank, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[rank][name] = split
            else:
                for rank in range(world_size):
                    output[rank][name] = ds.iterator()
        return output
