"""Checkpoints that survive a crash at any moment, and the RNG states a resumed run needs.

* ``atomic_write(path, write)``: write to a temporary file in the same directory, flush, fsync,
  then ``os.replace`` it over ``path`` and fsync the directory. A reader sees the old file or the
  complete new one, never a torn one; a crash mid-write leaves the previous file untouched.
* ``save_checkpoint(run_dir, epoch, state, keep)``: ``checkpoints/epoch_0007.pt`` written that way,
  then all but the newest ``keep`` removed (only after the new one is safely in place).
* ``load_latest_readable(run_dir)``: the newest checkpoint that loads, skipping (and naming)
  unreadable newer ones.
* ``load_checkpoint(path)``: ``torch.load(..., weights_only=True)``: checkpoints hold only tensors,
  numbers, strings, lists and dicts, so nothing in them can run code while loading.
* ``rng_state()`` / ``set_rng_state()``: Python, numpy, torch CPU and CUDA generators in that
  weights-only form.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
FORMAT = "lowrank-training-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^epoch_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not one of this harness's."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform can open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path`` and move it into place only once
    it is complete and on disk. On any error the temporary file is removed and ``path`` is left
    as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def json_safe(value):
    """NaN/Inf become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict:
    """Every global generator's state, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # another machine: at least the current device continues its stream
            torch.cuda.set_rng_state(cuda[0])


# ------------------------------------------------------------------------------------ files
def checkpoint_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"epoch_{epoch:04d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(epoch, path) of the run's checkpoints, oldest first (temporary files are ignored)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | os.PathLike, epoch: int, state: dict, keep: int = 1) -> Path:
    """Write ``state`` as the checkpoint of ``epoch`` atomically, then keep only the newest
    ``keep`` checkpoints (``keep`` <= 0 keeps all)."""
    payload = {"format": FORMAT, "version": FORMAT_VERSION, **state}
    path = atomic_write(checkpoint_path(run_dir, epoch), lambda f: torch.save(payload, f))
    if keep > 0:
        for _, old in list_checkpoints(run_dir)[:-keep]:
            if old != path:
                old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint written by ``save_checkpoint``; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot load checkpoint {path} ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of training/train.py")
    if state.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {state.get('version')}, "
                              f"this code reads version {FORMAT_VERSION}")
    return state


def load_latest_readable(run_dir: str | os.PathLike, log: Callable[[str], None] = print,
                         map_location="cpu") -> dict | None:
    """The newest checkpoint of ``run_dir`` that loads, or None when it has none. One that does
    not load (truncated by a crash outside ``atomic_write``, a full disk, a bad copy) is skipped
    for the next older one, saying so through ``log``; CheckpointError when none loads."""
    found = list_checkpoints(run_dir)
    failures = []
    for _, path in reversed(found):
        try:
            state = load_checkpoint(path, map_location=map_location)
        except CheckpointError as err:
            failures.append(str(err))
            continue
        if failures:
            log(f"warning: skipped {len(failures)} unreadable checkpoint(s) ({'; '.join(failures)}); "
                f"resuming from the newest readable one, {path.name}")
        return state
    if failures:
        raise CheckpointError(f"no checkpoint of {run_dir} can be loaded: " + "; ".join(failures))
    return None


def resolve_resume(target: str | os.PathLike) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    target = Path(target)
    if target.is_dir():
        latest = latest_checkpoint(target)
        if latest is None:
            raise CheckpointError(f"run directory {target} has no checkpoint in {target / CHECKPOINT_DIR}")
        return latest
    if not target.exists():
        raise CheckpointError(f"--resume {target}: no such checkpoint file or run directory")
    return target


def run_dir_of(checkpoint: str | os.PathLike) -> Path:
    """The run directory a checkpoint belongs to (the parent of ``checkpoints/``)."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.parent.name == CHECKPOINT_DIR:
        return checkpoint.parent.parent
    return checkpoint.parent
