"""Where runs live: a local folder, a shared filesystem path, or a URI (s3://, gs://, ...).

A URI is passed to Ray Train untouched (it writes checkpoints there itself); the few files the
driver reads or writes beside them (fingerprint, export) go through pyarrow's filesystems, so
the same code serves a laptop folder and a cluster bucket.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from raypref import atomic

# a run's folder name: one path component that cannot climb out of its storage root ('.', '..')
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
RUN_NAME_RULE = "must match ^[A-Za-z0-9][A-Za-z0-9._-]*$ (one folder name: no '/', '.', '..')"


class RefusedDelete(PermissionError):
    """A folder --restart was asked to delete is not a raypref run under its storage root."""


def is_run_name(name: str) -> bool:
    return isinstance(name, str) and RUN_NAME.fullmatch(name) is not None


def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve(path: str) -> str:
    """A URI unchanged; a local path made absolute (Ray Train wants absolute paths)."""
    return str(path) if is_uri(path) else str(Path(path).expanduser().resolve())


def join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts]) if is_uri(root) else str(Path(root, *parts))


def _fs(path: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(path)


def exists(path: str) -> bool:
    if not is_uri(path):
        return Path(path).exists()
    import pyarrow.fs as pafs

    fs, inner = _fs(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def read_text(path: str) -> str:
    if not is_uri(path):
        return Path(path).read_text()
    fs, inner = _fs(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    """Write a small file so that a reader never sees half of it: locally through a temporary
    name (raypref.atomic); an object store's single upload is atomic itself."""
    if not is_uri(path):
        atomic.write_text(path, text)
        return
    fs, inner = _fs(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def delete_run(root: str, name: str, marker: str) -> bool:
    """Delete the run folder ``<root>/<name>`` if it is one: ``name`` a valid run name, the folder
    directly under ``root`` (not a symlink out of it) and holding the file ``marker``. Returns
    whether there was a run to delete; raises RefusedDelete for a folder that is not a run.
    An empty folder is no run and is left alone."""
    if not is_run_name(name):
        raise RefusedDelete(f"refusing to delete run {name!r} in {root}: a run name {RUN_NAME_RULE}")
    run_dir = join(root, name)
    if is_uri(root):
        if not exists(run_dir):
            return False
        if not exists(join(run_dir, marker)):
            raise RefusedDelete(f"refusing to delete {run_dir}: it holds no {marker}, so it is "
                                  "not a raypref run; delete it yourself if it should go")
        fs, inner = _fs(run_dir)
        fs.delete_dir(inner)
        return True
    path = Path(run_dir)
    if path.is_symlink():
        raise RefusedDelete(f"refusing to delete {path}: it is a symlink (to {os.readlink(path)}), "
                              "not a run folder")
    if not path.exists():
        return False
    if path.resolve().parent != Path(root).resolve() or not path.is_dir():
        raise RefusedDelete(f"refusing to delete {path}: not a folder directly under {root}")
    fingerprint = path / marker
    if fingerprint.is_symlink() or not fingerprint.is_file():
        if not any(path.iterdir()):
            return False
        raise RefusedDelete(f"refusing to delete {path}: it holds no {marker}, so it is not a "
                              "raypref run; delete it yourself if it should go")
    import shutil

    shutil.rmtree(path)  # removes symlinks inside, never what they point to
    return True


def upload_dir(local: Path, target: str) -> None:
    import pyarrow.fs as pafs

    fs, inner = _fs(target)
    fs.create_dir(inner, recursive=True)
    pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_dir(source: str, local: Path) -> Path:
    import pyarrow.fs as pafs

    fs, inner = _fs(source)
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(inner, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(local)


def marker_of(target: str) -> str:
    """The file that names the published copy of a URI folder ``target``."""
    return f"{target.rstrip('/')}.published.json"


def publish_dir(local: Path, target: str) -> str:
    """Put a local folder at a URI ``target`` without ever showing a half-uploaded one: upload
    to a fresh staging prefix beside it, then publish a marker naming that prefix (one object
    write, atomic), then delete the copy the old marker named. Returns the published prefix."""
    import uuid

    old = published(target)
    staged = f"{target.rstrip('/')}.{uuid.uuid4().hex[:12]}"
    upload_dir(local, staged)
    write_text(marker_of(target), json.dumps({"path": staged}))
    if old and old != staged:
        fs, inner = _fs(old)
        fs.delete_dir(inner)
    return staged


def published(target: str) -> str | None:
    """The prefix that publish_dir last published for ``target``, or None."""
    marker = marker_of(target)
    return json.loads(read_text(marker))["path"] if exists(marker) else None
