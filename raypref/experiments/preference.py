"""Preference optimization of one policy on preference shards streamed through Ray Data: the
library behind ``jobs/dpo.py``. The method (DPO by default; IPO, ORPO, ... any preference-pair
method of the registry, ``--method``) is looked up by name in ``raypref.recipes``.

0. with ``--data.source`` (your own data, e.g. TRL's formats): read and validated in the driver
   before Ray starts (wrong columns: one error), bad rows to ``quarantine_source.jsonl``, the
   valid pairs split and written as the run's own train / test shards, read on as below;
1. a validation pass over the shards (train, and test if given): every bad row goes to the
   quarantine file, and too many bad rows stop the job *before* any training time is spent;
2. the SFT base (cached by config hash) or a given base policy;
3. a second, streaming pass: valid rows -> ``map_batches`` tokenization with the SFT
   tokenizer in the policy's own text format -> Ray Train workers
   (``get_dataset_shard("train")``) -> DPO on a LoRA over the SFT base -> adapter export;
4. implicit-reward accuracy on the held-out shards;
5. ``summary.json`` + MLflow metrics and artifacts.

The validation pass costs one extra read of the shards (cheap next to training) and keeps
nothing in memory: the quarantine actor counts each shard once, so the training pass, which
reads the shards again (once per epoch), never double counts.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from raypref import ray_session, tracking
from raypref.config import check_fields
from raypref.data.pipeline import (ExactSplitDataConfig, QuarantineReport, read_preference_shards,
                                   tokenize_pairs)
from raypref.data.records import validate_row
from raypref.data.source import PreferenceSource, read_source, write_pairs
from raypref.models.factory import encode_example, load_pretrained, resolve_model
from raypref.recipes import pair_methods, recipe
from raypref.recipes.dpo import DPOConfig
from raypref.experiments.run import SUMMARY_FILE, Experiment, JobResult, PolicyRunConfig, Run, run_experiment
from raypref.train.runner import Resources, runner_config

TRAIN_QUARANTINE_FILE = "quarantine.jsonl"
TEST_QUARANTINE_FILE = "quarantine_test.jsonl"
SHARD_FORMATS = ("parquet", "jsonl")


def _job_resources() -> Resources:
    return Resources(num_workers=1, cpus_per_worker=1.0, zero_stage=0, checkpoint_every=50)


@dataclass
class DPOJobConfig(PolicyRunConfig):
    """Preference optimization of one LoRA policy on preference shards (parquet / jsonl,
    `PreferenceRecord.to_row` schema)."""

    method: str = "dpo"  # a preference-pair method of raypref.recipes (dpo, ipo, ...); `training` is its section

    # a folder or pyarrow URI of shards, e.g. written by jobs/simulate.py
    train_data: str = "outputs/simulate/psoups"
    test_data: str = "outputs/simulate/psoups_test"  # held-out shards; "" = no evaluation
    # which shard files to read: jobs/simulate.py writes every shard twice (parquet + jsonl),
    # so reading both formats of its folders would count each pair twice
    shard_formats: list[str] = field(default_factory=lambda: ["parquet"])
    # keep only these users' rows ([] = every row); P-Soups preferences P1A..P3B are users 1..6;
    # a data.source without users (no user column) keeps every row
    user_ids: list[int] = field(default_factory=lambda: [1])
    # your own preference data (--data.source file --data.format trl): read, validated and split
    # into train / test here, in place of train_data / test_data
    data: PreferenceSource = field(default_factory=PreferenceSource)
    output_dir: str = "outputs/dpo"
    run_name: str = ""  # "" = dpo-<date>-<time>; an existing name resumes that run
    max_quarantine_fraction: float = 0.05  # of the rows read, per data set
    max_chars: int = 20000  # longest prompt / response accepted by validation
    max_eval_pairs: int = 2000
    eval_batch_size: int = 32
    training: DPOConfig = field(default_factory=DPOConfig)
    # on a small node keep cpus_per_worker * num_workers below the CPU count: Ray Data needs a
    # budget of its own or the stream into the workers stalls
    resources: Resources = field(default_factory=_job_resources)
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer (0: shard order)
    data_cpus: float = 0.5  # CPUs of each shard-validation task and each tokenizer actor
    tokenizer_actors: int = 1

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        self.validate_run("DPOJobConfig")
        if self.method not in pair_methods():
            raise ValueError(f"DPOJobConfig.method={self.method!r}: must be a preference-pair method, one of "
                             f"{pair_methods()}")
        recipe(self.method).check_section(self.training, "DPOJobConfig.training")
        self.resources.validate("DPOJobConfig.resources")
        self.data.validate("DPOJobConfig.data")
        checks = [
            ("train_data", bool(self.train_data), "must name a shard folder or URI"),
            ("shard_formats", bool(self.shard_formats) and set(self.shard_formats) <= set(SHARD_FORMATS),
             f"must be a non-empty subset of {SHARD_FORMATS}"),
            ("max_quarantine_fraction", 0.0 <= self.max_quarantine_fraction <= 1.0, "must be in [0, 1]"),
            ("max_chars", self.max_chars >= 1, "must be >= 1"),
            ("max_eval_pairs", self.max_eval_pairs >= 1, "must be >= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, "must be >= 1"),
            ("user_ids", all(isinstance(u, int) and u >= 0 for u in self.user_ids), "must be ids >= 0"),
            ("shuffle_buffer", self.shuffle_buffer >= 0, "must be >= 0"),
            ("data_cpus", self.data_cpus > 0, "must be > 0"),
            ("tokenizer_actors", self.tokenizer_actors >= 1, "must be >= 1"),
        ]
        check_fields("DPOJobConfig", self, checks)


@dataclass(frozen=True)
class SavedTokenizer:
    """Picklable zero-argument factory for the Ray Data tokenizer actors: the tokenizer
    saved with a model, loaded exactly as ``models.factory.load_pretrained`` loads it."""

    model_dir: str

    def __call__(self):
        from transformers import AutoTokenizer

        local = Path(resolve_model(self.model_dir)).expanduser()  # a named model: its converted folder
        tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else self.model_dir,
                                                  local_files_only=local.exists(), trust_remote_code=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token  # as load_pretrained does
        return tokenizer


def _is_selected_user(row: dict, user_ids: list[int]) -> bool:
    return int(row["user_id"]) in user_ids


def _log(msg: str) -> None:
    print(f"[dpo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- data

def read_rows(cfg: DPOJobConfig, uri: str, quarantine_path: Path) -> tuple[ray.data.Dataset, QuarantineReport]:
    """Valid rows of the shards under `uri` (only cfg.user_ids), lazily; bad rows to `quarantine_path`."""
    try:
        ds, report = read_preference_shards(
            uri, quarantine_path=str(quarantine_path), max_quarantine_fraction=cfg.max_quarantine_fraction,
            max_chars=cfg.max_chars, num_cpus=cfg.data_cpus,
            suffixes=tuple(f".{fmt}" for fmt in cfg.shard_formats))
    except FileNotFoundError as err:
        others = [fmt for fmt in SHARD_FORMATS if fmt not in cfg.shard_formats]
        hint = f"; shard_formats={cfg.shard_formats} were looked for" + (
            f", read others with --shard_formats {others[0]}" if others else "")
        raise FileNotFoundError(f"{err}{hint} (write shards with jobs/simulate.py, or set "
                                "--train_data / --test_data; --test_data '' for no evaluation)") from None
    if cfg.user_ids:
        ds = ds.filter(_is_selected_user, fn_kwargs={"user_ids": list(cfg.user_ids)},
                       num_cpus=cfg.data_cpus)
    return ds, report


CHEAP_HASH_BYTES = 64 * 2**20  # shards up to this size are hashed for the run's fingerprint


def shards_fingerprint(cfg: DPOJobConfig) -> dict:
    """What the training data is: each shard's name and size, and its content hash where cheap;
    plus the row selection. A resumed run must see the same data."""
    import hashlib

    from raypref.data.pipeline import list_shards

    filesystem, shards = list_shards(cfg.train_data, tuple(f".{fmt}" for fmt in cfg.shard_formats))
    files = {}
    for shard, info in zip(shards, filesystem.get_file_info(shards)):
        entry = {"bytes": info.size}
        if info.size is not None and info.size <= CHEAP_HASH_BYTES:
            with filesystem.open_input_stream(shard) as f:
                entry["sha256"] = hashlib.sha256(f.read()).hexdigest()[:16]
        files[shard] = entry
    return {"train_data": cfg.train_data, "shards": files, "user_ids": sorted(cfg.user_ids),
            "max_chars": cfg.max_chars}


def quarantine_metrics(summary: dict, prefix: str = "") -> dict[str, float]:
    """MLflow metrics of a quarantine summary: totals and one count per reason."""
    metrics = {f"{prefix}{k}": summary[k] for k in ("rows_total", "rows_valid", "rows_quarantined")}
    metrics.update({f"{prefix}quarantine.{reason}": n for reason, n in summary["by_reason"].items()})
    return metrics


def _validation_pass(cfg: DPOJobConfig, out: Path) -> tuple[dict[str, ray.data.Dataset], dict[str, dict]]:
    """Read + validate every shard once; log the quarantine; raise QuarantineExceeded if too
    many rows are bad. Returns the lazy selected rows and the quarantine summary per data set
    ("train", and "test" if cfg.test_data). Reuse these datasets: their quarantine actor
    counts each shard once, while a new one would start a new quarantine file."""
    sets = {"train": (cfg.train_data, out / TRAIN_QUARANTINE_FILE)}
    if cfg.test_data:
        sets["test"] = (cfg.test_data, out / TEST_QUARANTINE_FILE)
    datasets, reports, summaries = {}, {}, {}
    for name, (uri, path) in sets.items():
        datasets[name], reports[name] = read_rows(cfg, uri, path)
        selected = datasets[name].count()  # runs validation over every shard, streaming
        summary = summaries[name] = {**reports[name].summary(), "pairs_selected": selected}
        prefix = "" if name == "train" else "test."
        tracking.log_metrics({**quarantine_metrics(summary, prefix), f"{prefix}pairs_selected": selected})
        tracking.log_artifact(summary["path"], "quarantine")
        _log(f"{name}: {summary['rows_valid']}/{summary['rows_total']} rows valid, "
             f"{summary['rows_quarantined']} quarantined {summary['by_reason']} -> {summary['path']}; "
             f"{selected} pairs selected (user_ids={cfg.user_ids or 'all'})")
    for report in reports.values():
        report.check()  # QuarantineExceeded: the run ends FAILED with the counts logged above
    needed = cfg.training.micro_batch_size * cfg.resources.num_workers
    if summaries["train"]["pairs_selected"] < needed:
        raise ValueError(f"{cfg.train_data}: {summaries['train']['pairs_selected']} valid pairs for "
                         f"user_ids={cfg.user_ids or 'all'}, fewer than micro_batch_size x num_workers "
                         f"= {needed}")
    return datasets, summaries


def own_data(cfg: DPOJobConfig, out: Path) -> tuple[DPOJobConfig, dict]:
    """Read cfg.data.source (wrong columns: one error here, before Ray starts), quarantine its
    bad rows, split the valid pairs and write them as the run's train / test shards; the config
    that reads those shards instead of train_data / test_data, and the source's quarantine."""
    pairs = read_source(cfg.data, out, seed=cfg.seed, max_quarantine_fraction=cfg.max_quarantine_fraction,
                        max_chars=cfg.max_chars, log=_log)
    tracking.log_metrics(quarantine_metrics(pairs.quarantine, "source."))
    tracking.log_artifact(pairs.quarantine["path"], "quarantine")
    train_path = write_pairs(pairs.train, out / "data" / "train.parquet")
    test_path = write_pairs(pairs.test, out / "data" / "test.parquet") if pairs.test else None
    own = dataclasses.replace(cfg, train_data=str(train_path), test_data=str(test_path or ""),
                              shard_formats=["parquet"], user_ids=cfg.user_ids if cfg.data.has_users else [])
    return own, pairs.quarantine


# ---------------------------------------------------------------- the job

def evaluate_adapter(method: str, sft_dir: str, adapter_dir: Path, records: list, section,
                     batch_size: int = 32) -> dict[str, float]:
    """The method's held-out scores of the trained adapter (DPO's: implicit-reward accuracy, margin)."""
    from peft import PeftModel

    evaluate = recipe(method).evaluate
    if evaluate is None:
        return {}
    base, tokenizer = load_pretrained(sft_dir)
    return evaluate(PeftModel.from_pretrained(base, str(adapter_dir)), tokenizer, records, section, batch_size)


class PreferenceExperiment(Experiment):
    """Shards -> validation pass -> base -> Ray Data tokenization -> the runner -> held-out accuracy.

    The data checks run first, so bad data stops the job before any training (SFT included)
    is paid for; the MLflow run then ends FAILED with the counts logged."""

    job = "dpo"
    metrics_prefix = "train."

    def run_name(self, cfg: DPOJobConfig) -> str:
        return cfg.run_name or time.strftime("dpo-%Y%m%d-%H%M%S")

    def prepare(self, run: Run) -> None:
        cfg = run.cfg
        source = None
        if cfg.data.source:  # before Ray: a source with the wrong columns stops here
            cfg, source = own_data(cfg, run.out)
            run.cfg = cfg
        if not ray.is_initialized():
            ray_session.init(include_dashboard=False, configure_logging=False)
        _log(f"validating shards under {cfg.train_data}" + (f" and {cfg.test_data}" if cfg.test_data else ""))
        run.data["datasets"], run.data["quarantine"] = _validation_pass(cfg, run.out)
        quarantine = run.data["quarantine"]
        if source is not None:
            quarantine["source"] = source  # where your own data's bad rows went
        # already validated once, and held-out sets are small: collect them in the driver
        run.data["heldout"] = [validate_row(row, max_chars=cfg.max_chars)
                               for row in run.data["datasets"]["test"].take(cfg.max_eval_pairs)] \
            if "test" in quarantine and quarantine["test"]["pairs_selected"] else []

    def spec(self, run: Run):
        cfg, t = run.cfg, run.cfg.training
        n_pairs = run.data["quarantine"]["train"]["pairs_selected"]
        _log(f"{cfg.method} on {n_pairs} pairs: {t.steps} steps x {t.micro_batch_size} pairs x "
             f"{cfg.resources.num_workers} worker(s)")
        # scored during training only when asked (resources.eval_every): a curve, a sweep's metric
        heldout = run.data["heldout"] if cfg.resources.eval_every else []
        # the pairs stream from the Ray Data set "train" (run_kwargs), whatever the method
        return recipe(cfg.method).spec(t, run.base_dir, name=run.name, seed=cfg.seed, dataset="train",
                                       n_pairs=n_pairs, shuffle_buffer=cfg.shuffle_buffer, heldout=heldout)

    def runner_config(self, run: Run):
        # the Ray Train run lives in <run folder>/train, apart from the job's own files
        # (quarantine, summary), so --restart starts training over without deleting them
        cfg = run.cfg
        return runner_config(cfg.training, cfg.resources, name="train", seed=cfg.seed, storage_path=str(run.out))

    def run_kwargs(self, run: Run) -> dict:
        """The selected rows, tokenized in Ray Data in the policy's own format (as SFT and evaluation)."""
        cfg, t = run.cfg, run.cfg.training
        tokens = tokenize_pairs(run.data["datasets"]["train"], SavedTokenizer(run.base_dir), t.max_length,
                                num_actors=cfg.tokenizer_actors, num_cpus=cfg.data_cpus,
                                batch_size=max(t.micro_batch_size, 16), encode=encode_example)
        return {"datasets": {"train": tokens}, "dataset_config": ExactSplitDataConfig(),
                "data_fingerprint": shards_fingerprint(cfg)}

    def evaluate(self, run: Run, result) -> dict:
        cfg = run.cfg
        if result.export_path is None:
            raise RuntimeError(f"run {run.name}: training finished without an exported adapter")
        tracking.log_artifact(result.export_path, "adapter")
        records = run.data["heldout"]
        if not records:
            _log("no held-out pairs (test_data empty or no selected rows): no evaluation")
            return {"eval": {}}
        _log(f"held-out scores on {cfg.test_data}")
        scores = evaluate_adapter(cfg.method, run.base_dir, result.export_path, records, cfg.training,
                                  cfg.eval_batch_size)
        return {"eval": {**scores, "pairs": len(records)}}

    def summary(self, run: Run, result, evaluation: dict) -> dict:
        return {"method": run.cfg.method, "train_pairs": run.data["quarantine"]["train"]["pairs_selected"],
                "quarantine": run.data["quarantine"],
                "final_train_metrics": result.metrics[-1] if result.metrics else {}, **evaluation}

    def report(self, result: JobResult) -> None:
        summary = result.summary
        q = summary["quarantine"]["train"]
        _log(f"quarantine: {q['rows_quarantined']} of {q['rows_total']} rows {q['by_reason']} -> {q['path']}")
        final = summary["final_train_metrics"]
        if final:
            shown = [k for k in recipe(summary["method"]).summary if k in final]
            _log(f"last step {summary['steps']}: " + ", ".join(f"{k} {final[k]:.4f}" for k in shown))
        if summary["eval"]:
            _log("held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["eval"].items() if k != "pairs")
                 + f" on {summary['eval']['pairs']} pairs")
        _log(f"adapter: {result.policy_dir}")
        _log(f"summary: {result.output_dir / SUMMARY_FILE}")
        _log(f"mlflow: run {result.run_id} in {result.tracking_uri}")


def train_dpo(cfg: DPOJobConfig) -> JobResult:
    """Run the whole job (see the module docstring) inside one MLflow run.

    Raises ``QuarantineExceeded`` before training when a data set has more bad rows than
    ``max_quarantine_fraction``; the MLflow run then ends FAILED with the counts logged.
    """
    return run_experiment(PreferenceExperiment(), cfg)
