"""DPO of one policy on preference shards streamed through Ray Data: the library behind ``jobs/dpo.py``.

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

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import ray

from raypref import tracking
from raypref.config import check_fields
from raypref.data.pipeline import (ExactSplitDataConfig, QuarantineReport, read_preference_shards,
                                   tokenize_pairs)
from raypref.data.records import validate_row
from raypref.models.factory import check_lora_targets, encode_example, load_pretrained, resolve_model
from raypref.eval.pairs import evaluate_pairs
from raypref.recipes.dpo import DPOConfig, ShardDPOSpec
from raypref.recipes.sft import SFTConfig, train_sft
from raypref.train.runner import Resources, RunResult, run, runner_config

SUMMARY_FILE = "summary.json"
TRAIN_QUARANTINE_FILE = "quarantine.jsonl"
TEST_QUARANTINE_FILE = "quarantine_test.jsonl"
SHARD_FORMATS = ("parquet", "jsonl")


def _job_resources() -> Resources:
    return Resources(num_workers=1, cpus_per_worker=1.0, zero_stage=0, checkpoint_every=50)


@dataclass
class DPOJobConfig:
    """DPO of one LoRA policy on preference shards (parquet / jsonl, `PreferenceRecord.to_row` schema)."""

    # a folder or pyarrow URI of shards, e.g. written by jobs/simulate.py
    train_data: str = "outputs/simulate/psoups"
    test_data: str = "outputs/simulate/psoups_test"  # held-out shards; "" = no evaluation
    # which shard files to read: jobs/simulate.py writes every shard twice (parquet + jsonl),
    # so reading both formats of its folders would count each pair twice
    shard_formats: list[str] = field(default_factory=lambda: ["parquet"])
    # keep only these users' rows ([] = every row); P-Soups preferences P1A..P3B are users 1..6
    user_ids: list[int] = field(default_factory=lambda: [1])
    output_dir: str = "outputs/dpo"  # the run's files go to <output_dir>/<run_name>/
    run_name: str = ""  # "" = dpo-<date>-<time>; an existing name resumes that run
    base_policy: str = ""  # "" = the SFT warm start below; else a saved model folder or HF id
    sft: SFTConfig = field(default_factory=SFTConfig)
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
    seed: int = 0  # LoRA initialisation, shuffling
    restart: bool = False  # start the run over even if <output_dir>/<run_name> holds one

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        self.training.validate("DPOJobConfig.training")
        self.resources.validate("DPOJobConfig.resources")
        if not self.base_policy:
            self.sft.validate()
        checks = [
            ("train_data", bool(self.train_data), "must name a shard folder or URI"),
            ("shard_formats", bool(self.shard_formats) and set(self.shard_formats) <= set(SHARD_FORMATS),
             f"must be a non-empty subset of {SHARD_FORMATS}"),
            ("run_name", "/" not in self.run_name, "must be a folder name, without '/'"),
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


@dataclass
class DPOJobResult:
    """What a finished job left behind."""

    output_dir: Path  # <output_dir>/<run_name>: summary, quarantine files, Ray Train run
    adapter_dir: Path  # the LoRA adapter (adapter_model.safetensors + config)
    summary: dict
    run_id: str
    tracking_uri: str


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


# ---------------------------------------------------------------- training and evaluation

def _train(cfg: DPOJobConfig, sft_dir: str, rows: ray.data.Dataset, n_pairs: int,
           run_name: str) -> RunResult:
    """Tokenize the selected rows in Ray Data and train the LoRA on them with the runner."""
    t = cfg.training
    tokens = tokenize_pairs(rows, SavedTokenizer(sft_dir), t.max_length, num_actors=cfg.tokenizer_actors,
                            num_cpus=cfg.data_cpus, batch_size=max(t.micro_batch_size, 16),
                            encode=encode_example)  # the policy's own format: as SFT and evaluation
    spec = ShardDPOSpec.from_config(t, sft_dir, [], name=run_name, seed=cfg.seed, n_pairs=n_pairs,
                                    shuffle_buffer=cfg.shuffle_buffer)
    # the Ray Train run lives in <output_dir>/<run_name>/train, apart from the job's own files
    # (quarantine, summary), so --restart starts training over without deleting them
    runner_cfg = runner_config(t, cfg.resources, name="train", seed=cfg.seed,
                               storage_path=str(Path(cfg.output_dir).expanduser().resolve() / run_name))
    return run(spec, runner_cfg, datasets={"train": tokens}, dataset_config=ExactSplitDataConfig(),
               data_fingerprint=shards_fingerprint(cfg), restart=cfg.restart)


def evaluate_adapter(sft_dir: str, adapter_dir: Path, records: list, beta: float, max_length: int,
                     batch_size: int) -> dict[str, float]:
    """Implicit-reward accuracy and margin of the trained adapter on held-out pairs."""
    from peft import PeftModel

    base, tokenizer = load_pretrained(sft_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return evaluate_pairs(model, tokenizer, records, beta, max_length=max_length, batch_size=batch_size)


# ---------------------------------------------------------------- the job

def train_dpo(cfg: DPOJobConfig) -> DPOJobResult:
    """Run the whole job (see the module docstring) inside one MLflow run.

    Raises ``QuarantineExceeded`` before training when a data set has more bad rows than
    ``max_quarantine_fraction``; the MLflow run then ends FAILED with the counts logged.
    """
    cfg.validate()
    check_lora_targets(cfg.base_policy or cfg.sft.model.name_or_path, cfg.training.lora, "training.lora")
    run_name = cfg.run_name or time.strftime("dpo-%Y%m%d-%H%M%S")
    out = Path(cfg.output_dir).expanduser().resolve() / run_name
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with tracking.start_run("dpo", cfg, cfg.output_dir, run_name=run_name) as mlflow_run:
        _log(f"output: {out}")
        _log(f"mlflow: {tracking.run_url(mlflow_run)}")
        if not ray.is_initialized():
            ray.init(include_dashboard=False, configure_logging=False)

        phase = time.perf_counter()
        # first, so bad data stops the job before any training (SFT included) is paid for
        _log(f"1/4 validating shards under {cfg.train_data}" + (f" and {cfg.test_data}" if cfg.test_data else ""))
        datasets, quarantine = _validation_pass(cfg, out)
        n_train = quarantine["train"]["pairs_selected"]
        seconds["validation"], phase = time.perf_counter() - phase, time.perf_counter()

        _log("2/4 base policy" + ("" if cfg.base_policy else " (SFT, cached by config hash)"))
        sft_dir = cfg.base_policy or str(train_sft(cfg.sft))
        mlflow.set_tag("raypref.base_policy", sft_dir)
        seconds["base"], phase = time.perf_counter() - phase, time.perf_counter()

        _log(f"3/4 DPO on {n_train} pairs: {cfg.training.steps} steps x {cfg.training.micro_batch_size} "
             f"pairs x {cfg.resources.num_workers} worker(s)")
        result = _train(cfg, sft_dir, datasets["train"], n_train, run_name)
        if result.export_path is None:
            raise RuntimeError(f"run {run_name}: training finished without an exported adapter")
        for metrics in result.metrics:
            tracking.log_metrics({f"train.{k}": v for k, v in metrics.items() if k != "step"},
                                 step=int(metrics["step"]))
        tracking.log_artifact(result.export_path, "adapter")
        seconds["training"], phase = time.perf_counter() - phase, time.perf_counter()

        evaluation: dict[str, float] = {}
        if "test" in datasets and quarantine["test"]["pairs_selected"]:
            _log(f"4/4 held-out implicit-reward accuracy on {cfg.test_data}")
            # already validated once, and held-out sets are small: collect them in the driver
            records = [validate_row(row, max_chars=cfg.max_chars)
                       for row in datasets["test"].take(cfg.max_eval_pairs)]
            evaluation = {**evaluate_adapter(sft_dir, result.export_path, records, cfg.training.beta,
                                             cfg.training.max_length, cfg.eval_batch_size),
                          "pairs": len(records)}
            tracking.log_metrics({f"eval.{k}": v for k, v in evaluation.items()})
        else:
            _log("4/4 no held-out pairs (test_data empty or no selected rows): no evaluation")
        seconds["evaluation"] = time.perf_counter() - phase

        summary = {
            "run_name": run_name, "output_dir": str(out), "adapter_dir": str(result.export_path),
            "base_policy": sft_dir, "mlflow_run_id": mlflow_run.info.run_id,
            "tracking_uri": mlflow.get_tracking_uri(), "train_pairs": n_train,
            "quarantine": quarantine, "steps": result.final_step,
            "final_train_metrics": result.metrics[-1] if result.metrics else {},
            "eval": evaluation, "seconds": {k: round(v, 1) for k, v in seconds.items()},
        }
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        tracking.log_artifact(out / SUMMARY_FILE)
    _print_summary(summary)
    return DPOJobResult(out, result.export_path, summary, mlflow_run.info.run_id, summary["tracking_uri"])


def _print_summary(summary: dict) -> None:
    q = summary["quarantine"]["train"]
    _log(f"quarantine: {q['rows_quarantined']} of {q['rows_total']} rows {q['by_reason']} -> {q['path']}")
    final = summary["final_train_metrics"]
    if final:
        _log(f"last step {summary['steps']}: loss {final['loss']:.4f}, "
             f"train reward accuracy {final['reward_accuracy']:.3f}")
    if summary["eval"]:
        e = summary["eval"]
        _log(f"held-out: reward accuracy {e['reward_accuracy']:.3f}, margin {e['reward_margin']:.3f} "
             f"on {e['pairs']} pairs")
    _log(f"adapter: {summary['adapter_dir']}")
    _log(f"summary: {Path(summary['output_dir']) / SUMMARY_FILE}")
    _log(f"mlflow: run {summary['mlflow_run_id']} in {summary['tracking_uri']}")
