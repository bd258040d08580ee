"""What every ``jobs/*.py`` entry point shares: a readable console and short error exits.

    main = job_main(PPOJobConfig, train_ppo, __doc__)   # flags -> config -> experiment

    if __name__ == "__main__":
        run_job(main)

``run_job`` quiets library output (``quiet_console``), runs ``main(argv)``, and turns the
failures a person causes and can fix (a bad config, missing data, a quarantine over its
limit, a run that may not resume) into one ``error: ...`` line on stderr and exit code 2.
Anything else keeps its traceback: it is a bug to report, not a setting to change.
Set ``RAYPREF_VERBOSE=1`` to see every library message on the console again.
"""
from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

EXIT_EXPECTED = 2  # same code argparse uses for a bad command line
EXIT_INTERRUPTED = 130

# (module, class name): imported by name, so a class that does not exist yet (the run
# fingerprint's RunMismatch) is simply not caught until it does
_EXPECTED_BY_NAME = (
    ("raypref.config", "ConfigError"),
    ("raypref.data.quarantine", "QuarantineExceeded"),
    ("raypref.train.fingerprint", "RunMismatch"),
    ("raypref.train.storage", "RefusedDelete"),
    ("raypref.train.state_io", "UnsafeCheckpoint"),
    ("raypref.ray_session", "ResourceWaitTimeout"),
)
# ValueErrors are expected only when a config's check raised them
_VALIDATING_FUNCTIONS = {"validate", "__post_init__"}


def _expected_types() -> tuple[type, ...]:
    types_: list[type] = [FileNotFoundError]
    for module, name in _EXPECTED_BY_NAME:
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(cls, type):
            types_.append(cls)
    return tuple(types_)


def _related(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then the exceptions it wraps: explicit causes, Ray task causes, the failures
    of Ray Train's workers or controller (breadth first, each once)."""
    queue, seen = [exc], set()
    while queue:
        err = queue.pop(0)
        if id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        nested = [err.__cause__, err.__context__, getattr(err, "cause", None),
                  getattr(err, "controller_failure", None),
                  *(getattr(err, "worker_failures", None) or {}).values()]
        queue += [e for e in nested if isinstance(e, BaseException)]


def _raised_while_validating(exc: BaseException) -> bool:
    return any(frame.f_code.co_name in _VALIDATING_FUNCTIONS
               for frame, _ in traceback.walk_tb(exc.__traceback__))


def expected_error(exc: BaseException) -> BaseException | None:
    """The exception behind `exc` that a person caused and can fix, or None (a bug)."""
    expected = _expected_types()
    for err in _related(exc):
        if isinstance(err, expected):
            return err
        if isinstance(err, ValueError) and _raised_while_validating(err):
            return err
    return None


def error_line(err: BaseException) -> str:
    """One line for the console: the message (a FileNotFoundError's file included)."""
    if isinstance(err, FileNotFoundError) and err.filename:
        message = f"{err.strerror or 'not found'}: {err.filename}"
    else:
        message = str(err) or type(err).__name__
    return "error: " + " ".join(message.split())


def job_main(config: type, experiment: Callable[[Any], Any], doc: str | None = None
             ) -> Callable[[list[str] | None], Any]:
    """A job's ``main(argv)``: its config from the defaults, ``--config file.yaml`` and the
    flags (``--help`` prints ``doc`` and every field), then ``experiment(config)``."""
    def main(argv: list[str] | None = None) -> Any:
        from raypref.config import parse_args

        return experiment(parse_args(config, argv, description=doc))

    return main


def run_job(main: Callable[[list[str]], Any], argv: list[str] | None = None,
            quiet: bool = True) -> Any:
    """Run a job's ``main(argv)`` for a person at a terminal (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if quiet and os.environ.get("RAYPREF_VERBOSE", "") in ("", "0"):
        quiet_console()
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - sorted into expected / bug just below
        err = expected_error(exc)
        if err is None:
            raise
        print(error_line(err), file=sys.stderr, flush=True)
        sys.exit(EXIT_EXPECTED)


# ---------------------------------------------------------------- a readable console

# Inherited by Ray's worker processes when set before ray.init starts the local cluster.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' and datasets' bars follow huggingface_hub
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "RAY_LOGGER_LEVEL": "warning",  # ray.init's default level for the driver's "ray" logger
    # library DeprecationWarning / FutureWarning / UserWarning in workers (Python reads this
    # at start-up, so it changes children only); RuntimeWarnings still show
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning",
    # Ray Train both prints and logs each worker print(): keep the print, once
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}

# Lines Ray forwards from its workers that say nothing a person running a job needs; they
# still reach the worker logs under the Ray session folder and the job's noise log.
WORKER_NOISE = tuple(re.compile(p) for p in (
    r"DeepSpeed .* built successfully",
    r"\[WARNING\] \[lr_schedules\.py",  # "get learning rate before it has started" & co.
    r"^Setting up process group for",
    r"^Requesting resources:",
    r"^Attempting to start training worker group",
    r"^Started training worker group",
    r"^- \(ip=.*\) world_rank=",
    r"^Checkpoint successfully created at",
    r"^Reporting training result",
    r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher'",
    r"(Loading weights|Writing model shards|Loading checkpoint shards):\s+\d+%",
    # Ray Train's PlacementGroupCleaner (a safety net for crashed controllers) asks the state
    # API, which is off without the dashboard, and says so every few seconds of every run
    r"Failed to query Ray Train Controller actor state",
))

NOISY_LOGGERS = ("mlflow", "ray._private.authentication", "ray.data", "deepspeed", "DeepSpeed",
                 "transformers", "datasets", "huggingface_hub", "alembic", "urllib3")

_state: dict[str, Any] = {}


def quiet_console(log_path: str | Path | None = None) -> Path:
    """Keep library noise off the console and in a log file; returns that file's path.

    Sets environment variables the Ray workers inherit (progress bars off, warning filters,
    log levels), filters library warnings and log records below ERROR in this process into
    the log file, and drops known Ray worker start-up / checkpoint chatter from the lines
    Ray forwards to the driver (the ``[runner]`` progress lines and every error still show).
    Call it before ``ray`` starts. Idempotent.
    """
    if "log_path" in _state:
        return _state["log_path"]
    path = Path(log_path or os.environ.get("RAYPREF_NOISE_LOG") or Path(
        tempfile.gettempdir(), "raypref-logs",
        f"{Path(sys.argv[0]).stem or 'job'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"))
    path.parent.mkdir(parents=True, exist_ok=True)
    _state["log_path"] = path
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)

    handler = logging.FileHandler(path, delay=True)  # no file until something is logged
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    _state["file"] = handler
    _route_library_warnings(handler)
    for name in NOISY_LOGGERS:
        _quiet_logger(logging.getLogger(name), handler)
    _quiet_libraries()
    _filter_worker_lines(handler)
    return path


def _route_library_warnings(handler: logging.Handler) -> None:
    """Warnings raised from library code (site-packages) go to the log file; warnings about
    raypref's own code still print."""
    shown = warnings.showwarning
    log = logging.getLogger("raypref.library_warnings")
    log.addHandler(handler)
    log.propagate = False

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if _module_of(filename) is None:
            shown(message, category, filename, lineno, file, line)
        else:
            log.warning(warnings.formatwarning(message, category, filename, lineno, line).strip())

    warnings.showwarning = showwarning


def _module_of(filename: str) -> str | None:
    """The dotted module of a source file inside site-packages (None for other files)."""
    parts = Path(filename).with_suffix("").parts
    if "site-packages" not in parts:
        return None
    return ".".join(parts[parts.index("site-packages") + 1:])


def _quiet_logger(logger: logging.Logger, handler: logging.Handler) -> None:
    """Records below ERROR go to the file only; errors still reach the console."""
    logger.addHandler(handler)
    consoles = [h for h in logger.handlers if not isinstance(h, logging.FileHandler)]
    for console in consoles:  # a library's own log files keep their level
        console.setLevel(logging.ERROR)
    if not consoles:
        console = logging.StreamHandler()
        console.setLevel(logging.ERROR)
        logger.addHandler(console)
    logger.propagate = False


def _quiet_libraries() -> None:
    """Libraries already imported read their settings at import: tell them directly."""
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()


def is_worker_noise(line: str) -> bool:
    """True for a line Ray forwards from a worker that `quiet_console` keeps off the console."""
    return any(p.search(line) for p in WORKER_NOISE)


def _filter_worker_lines(handler: logging.Handler) -> None:
    """Drop WORKER_NOISE lines from what Ray forwards to the driver's console (log_to_driver
    stays on: the runner's progress lines come this way). Ray has no public hook for this;
    if its private dispatcher moves, the lines simply show as before."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    emit = dispatcher.emit
    noise_log = logging.getLogger("raypref.worker_noise")
    noise_log.addHandler(handler)
    noise_log.setLevel(logging.INFO)
    noise_log.propagate = False

    def filtered_emit(data):
        lines = data.get("lines") or []
        kept = [line for line in lines if not is_worker_noise(line)]
        for line in lines:
            if is_worker_noise(line):
                noise_log.info("(pid=%s) %s", data.get("pid"), line)
        if kept or not lines:
            emit({**data, "lines": kept})

    dispatcher.emit = filtered_emit
