"""Writes that a crash cannot leave half done: a reader finds the old file (or folder) or the new
one, never a mix and never nothing where there was something.

A file is written to a temporary name in its own folder, fsynced, renamed over the target and
the folder fsynced (a rename is atomic only within one filesystem, hence the same folder). A
folder cannot be renamed over a non-empty one, so a folder swap moves the old one aside to a
fixed name first; a crash between the two renames leaves that aside folder, and
`recover_dir` (called by every swap and by whoever reads the folder first) moves it back.

This module imports nothing of raypref, so every layer may use it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any, **dumps_kwargs) -> Path:
    return write_text(path, json.dumps(obj, **dumps_kwargs))


def _aside(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def _fsync_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            fd = os.open(Path(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def recover_dir(target: str | Path) -> Path:
    """Finish or undo a folder swap a crash interrupted: the old folder moved aside comes back
    when no new one took its place; leftovers of unfinished swaps are removed."""
    target = Path(target)
    aside = _aside(target)
    if aside.exists():
        if target.exists():
            shutil.rmtree(aside)  # the new folder is in place: the old one was about to go
        else:
            os.replace(aside, target)
            _fsync_dir(target.parent)
    for partial in target.parent.glob(f".{target.name}.new-*"):
        shutil.rmtree(partial, ignore_errors=True)
    return target


def replace_dir(target: str | Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp) on a fresh sibling folder of target, fsync it, then swap it in place of
    target: move the old folder aside, rename the new one in, delete the old one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():
            os.replace(target, _aside(target))
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover_dir(target)
        raise
    shutil.rmtree(_aside(target), ignore_errors=True)
    return target
