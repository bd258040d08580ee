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
from raypref.data.pipeline import (ExactSplitDataConfig, QuarantineReport, read_preference_shards,
                                   tokenize_pairs)
from raypref.data.records import validate_row
from raypref.models.factory import LoraSettings, encode_example, load_pretrained
from raypref.train.runner import RunResult, run
from raypref.recipes.sft import SFTConfig, train_sft
from raypref.recipes.dpo import DEFAULT_BETA, DEFAULT_LR, ShardDPOSpec, evaluate_pairs

SUMMARY_FILE = "summary.json"
TRAIN_QUARANTINE_FILE = "quarantine.jsonl"
TEST_QUARANTINE_FILE = "quarantine_test.jsonl"
LOSS_TYPES = ("sigmoid", "ipo")
SHARD_FORMATS = ("parquet", "jsonl")


@dataclass
class DPOTraining:
    """The DPO optimisation (defaults: the soups probe of PLATFORM-NOTES)."""

    steps: int = 200  # optimizer steps
    micro_batch_size: int = 8  # pairs per micro-batch per worker
    grad_accum: int = 1
    lr: float = DEFAULT_LR
    warmup_steps: int = 10
    beta: float = DEFAULT_BETA
    loss_type: str = "sigmoid"  # "sigmoid" (DPO) or "ipo"
    max_length: int = 128  # tokens per prompt + response
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=8, alpha=16))
    shuffle_buffer: int = 256  # rows in each worker's local shuffle buffer (0: shard order)
    seed: int = 0


@dataclass
class DPOResources:
    """Ray resources. On a small node keep cpus_per_worker * num_workers below the CPU count:
    Ray Data needs a budget of its own or the stream into the workers stalls."""

    num_workers: int = 1
    cpus_per_worker: float = 1.0
    data_cpus: float = 0.5  # each shard-validation task and each tokenizer actor
    tokenizer_actors: int = 1
    use_gpu: bool = False
    zero_stage: int = 0  # LoRA states are tiny; ZeRO-2/3 for big bases
    bf16: bool = False
    max_failures: int = 1
    checkpoint_every: int = 50


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
    training: DPOTraining = field(default_factory=DPOTraining)
    resources: DPOResources = field(default_factory=DPOResources)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        t, r = self.training, self.resources
        checks = [
            ("train_data", bool(self.train_data), "must name a shard folder or URI"),
            ("shard_formats", bool(self.shard_formats) and set(self.shard_formats) <= set(SHARD_FORMATS),
             f"must be a non-empty subset of {SHARD_FORMATS}"),
            ("run_name", "/" not in self.run_name, "must be a folder name, without '/'"),
            ("max_quarantine_fraction", 0.0 <= self.max_quarantine_fraction <= 1.0, "must be in [0, 1]"),
            ("max_chars", self.max_chars >= 1, "must be >= 1"),
            ("max_eval_pairs", self.max_eval_pairs >= 1, "must be >= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, "must be >= 1"),
            ("training.steps", t.steps >= 1, "must be >= 1"),
            ("training.beta", t.beta > 0, "must be > 0"),
            ("training.loss_type", t.loss_type in LOSS_TYPES, f"must be one of {LOSS_TYPES}"),
            ("training.max_length", t.max_length >= 8, "must be >= 8"),
            ("training.shuffle_buffer", t.shuffle_buffer >= 0, "must be >= 0"),
            ("resources.data_cpus", r.data_cpus > 0, "must be > 0"),
            ("resources.tokenizer_actors", r.tokenizer_actors >= 1, "must be >= 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                value = self
                for part in name.split("."):
                    value = getattr(value, part)
                raise ValueError(f"DPOJobConfig.{name}={value!r}: {rule}")


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

        local = Path(self.model_dir).expanduser()
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
            max_chars=cfg.max_chars, num_cpus=cfg.resources.data_cpus,
            suffixes=tuple(f".{fmt}" for fmt in cfg.shard_formats))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (write shards with jobs/simulate.py, or set train_data / "
                                "test_data)") from None
    if cfg.user_ids:
        ds = ds.filter(_is_selected_user, fn_kwargs={"user_ids": list(cfg.user_ids)},
                       num_cpus=cfg.resources.data_cpus)
    return ds, report


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
    t, r = cfg.training, cfg.resources
    tokens = tokenize_pairs(rows, SavedTokenizer(sft_dir), t.max_length, num_actors=r.tokenizer_actors,
                            num_cpus=r.data_cpus, batch_size=max(t.micro_batch_size, 16),
                            encode=encode_example)  # the policy's own format: as SFT and evaluation
    spec = ShardDPOSpec(sft_dir=sft_dir, preference=run_name, lora=t.lora, beta=t.beta,
                        loss_type=t.loss_type, max_length=t.max_length, micro_batch_size=t.micro_batch_size,
                        grad_accum=t.grad_accum, seed=t.seed, n_pairs=n_pairs, shuffle_buffer=t.shuffle_buffer)
    runner_cfg = spec.runner_config(
        lr=t.lr, max_steps=t.steps, warmup_steps=t.warmup_steps, num_workers=r.num_workers,
        cpus_per_worker=r.cpus_per_worker, use_gpu=r.use_gpu, zero_stage=r.zero_stage, bf16=r.bf16,
        max_failures=r.max_failures, checkpoint_every=r.checkpoint_every,
        storage_path=str(Path(cfg.output_dir).expanduser().resolve()), name=run_name, seed=t.seed,
        log_every=max(1, t.steps // 10))
    return run(spec, runner_cfg, datasets={"train": tokens}, dataset_config=ExactSplitDataConfig())


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
