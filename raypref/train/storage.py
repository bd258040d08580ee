"""Where runs live: a local folder, a shared filesystem path, or a URI (s3://, gs://, ...).

A URI is passed to Ray Train untouched (it writes checkpoints there itself); the few files the
driver reads or writes beside them (fingerprint, export) go through pyarrow's filesystems, so
the same code serves a laptop folder and a cluster bucket.
"""
from __future__ import annotations

import os
from pathlib import Path


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
    """Write a small file; locally through a temporary name, so a reader never sees half of it."""
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        partial = f"{path}.partial"
        Path(partial).write_text(text)
        os.replace(partial, path)
        return
    fs, inner = _fs(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def delete_dir(path: str) -> None:
    if not is_uri(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return
    fs, inner = _fs(path)
    fs.delete_dir(inner)


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
