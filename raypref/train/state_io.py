"""Checkpoint state that loads without running code: JSON for the structure, safetensors for
the tensors and arrays, and DeepSpeed's own files through torch's weights-only unpickler.

A pickle runs whatever code it names when it is loaded, so a checkpoint that anyone with write
access to the storage could swap must not hold one. `save_state` takes nested dicts, lists,
tuples, JSON scalars, torch tensors and numpy arrays (the RNG states, a spec's buffers);
anything else is refused when it is saved, not when a resume needs it.
"""
from __future__ import annotations

import json
import pickle  # only for its error type: nothing here unpickles
from pathlib import Path
from typing import Any

import numpy as np
import torch

PICKLE_SUFFIXES = (".pkl", ".pickle")


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint holds a file that only an unpickler that runs code could read."""


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu").clone().contiguous()  # no shared storage
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        # safetensors has no unsigned 32/64-bit torch types on every version: widen to int64
        wide = value.astype(np.int64) if value.dtype.kind == "u" and value.dtype.itemsize >= 4 else value
        tensors[key] = torch.from_numpy(np.ascontiguousarray(wide)).clone()
        return {"__ndarray__": key, "dtype": str(value.dtype)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors, f"{where} key"), _encode(v, tensors, f"{where}[{k!r}]")]
                              for k, v in value.items()]}
    raise TypeError(f"checkpoint state {where}: a {type(value).__name__} cannot be saved; a "
                    "checkpoint holds dicts, lists, tuples, JSON scalars, tensors and numpy arrays")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy().astype(np.dtype(value["dtype"]))
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


def save_state(state: Any, folder: str | Path, stem: str) -> None:
    """Write ``<stem>.json`` and ``<stem>.safetensors`` in folder."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, stem)
    save_file(tensors, str(Path(folder) / f"{stem}.safetensors"))
    (Path(folder) / f"{stem}.json").write_text(json.dumps(tree))


def load_state(folder: str | Path, stem: str) -> Any:
    from safetensors.torch import load_file

    tree = json.loads((Path(folder) / f"{stem}.json").read_text())
    return _decode(tree, load_file(str(Path(folder) / f"{stem}.safetensors")))


def refuse_pickles(folder: str | Path) -> None:
    """Raise UnsafeCheckpoint if a checkpoint folder holds a pickle file."""
    found = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                   if p.suffix in PICKLE_SUFFIXES)
    if found:
        raise UnsafeCheckpoint(
            f"checkpoint {folder} holds pickle file(s) {found}: raypref does not unpickle "
            "checkpoints (a pickle runs code when it is loaded). A checkpoint written by an older "
            "raypref resumes only with that version; otherwise start the run over (--restart true).")


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a checkpoint folder cannot be restored (a truncated or corrupt file), or None. Reads
    every file's integrity without loading it: a torch zip's CRCs, a safetensors header, JSON.
    A pickle file raises UnsafeCheckpoint instead: that is not damage to fall back from."""
    import zipfile

    from safetensors import safe_open

    folder = Path(folder)
    refuse_pickles(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder)
        try:
            if path.suffix == ".pt":
                if not zipfile.is_zipfile(path):
                    return f"{name} is not a torch zip file"
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
                if bad:
                    return f"{name}: entry {bad} fails its CRC"
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as f:
                    for key in f.keys():
                        f.get_slice(key)
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as err:  # any reader's error: the file is damaged
            return f"{name}: {type(err).__name__}: {str(err)[:200]}"
    return None


def _deepspeed_globals() -> list:
    """The few non-tensor types DeepSpeed 0.19 puts in its ZeRO optimizer files (found by
    loading stage 0-3 checkpoints with weights_only=True): plain records, no code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_torch_weights_only(path: str, map_location=None) -> Any:
    """torch.load of a DeepSpeed checkpoint file with the weights-only unpickler; a file that
    needs anything more is refused with UnsafeCheckpoint."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # what the weights-only unpickler raises for a global
        raise UnsafeCheckpoint(f"checkpoint file {path} holds objects beyond tensors and "
                               f"DeepSpeed's own records, so it is not loaded: {str(err)[:300]}") from err


def load_deepspeed_safely(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files with `load_torch_weights_only` (its
    own checkpoint engine calls torch.load(weights_only=False))."""
    engine.checkpoint_engine.load = load_torch_weights_only
