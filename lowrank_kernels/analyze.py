"""Rank measures of every weight matrix in a saved checkpoint.

    python -m lowrank_kernels.analyze CHECKPOINT [--eps 1e-3] [--method exact|randomized]
                                                 [--device cpu|cuda] [--csv OUT]

CHECKPOINT is a ``torch.save(model)`` file, a ``state_dict``, or a training checkpoint: a dict
with a ``model``, ``state_dict`` or ``model_state_dict`` entry holding either. The file is first
read with ``torch.load(weights_only=True)``; a whole pickled model needs full unpickling, which
runs code from the file, so it is done only after that fails, with a warning (``--weights-only``
refuses it).

Matrices: for a model, its Linear, ConvNd, ConvTransposeNd, MultiheadAttention and Embedding
weights by the rules of DESIGN.md section 2. For a state_dict (no module types to go by), every
floating tensor of dim >= 2 whose name ends with ``weight``: 2-D as is, higher as a convolution
(out, rest). Prints one row per matrix and the average threshold rank (and the average over
Galanti et al.'s 17 ResNet-18 matrices when the names are a ResNet's).
"""
from __future__ import annotations

import argparse
import csv
import os
import pickle
import re
import sys
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from .spectral import all_measures, singular_values, tracked_matrices
from .tracker import format_table, galanti_resnet18_layers

COLUMNS = ("threshold_rank", "effective_rank", "normalized_effective_rank", "stable_rank", "spectral_norm",
           "frobenius_norm")
CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict")


class CheckpointError(ValueError):
    """The file cannot be read as a model or state_dict."""


def load_checkpoint(path: str, allow_pickle: bool = True):
    """The object saved in ``path``: read weights-only first; only when the weights-only unpickler
    rejects a class (a whole pickled model) and ``allow_pickle``, fully unpickled, with a warning."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    _check_file_kind(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" not in str(err).lower():
            raise CheckpointError(f"{path} is not a PyTorch checkpoint ({_short(err)})") from err
        safe_error = err
    except Exception as err:  # a damaged archive or pickle fails in many ways
        raise CheckpointError(f"{path} is a damaged or truncated PyTorch checkpoint ({_short(err)})") from err
    if not allow_pickle:
        raise CheckpointError(f"{path} cannot be loaded with weights_only=True; it holds pickled "
                              f"classes (a whole model?): rerun without --weights-only if you trust "
                              f"the file ({_short(safe_error)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # e.g. the model's class cannot be imported here
        raise CheckpointError(f"{path} could not be unpickled ({_short(err)}); if it is a whole "
                              "model, its class must be importable") from err
    print(f"warning: {path} is not weights-only and was fully unpickled (weights_only=False), "
          "which runs code from the file: only analyze files you trust", file=sys.stderr)
    return obj


ZIP_MAGIC = b"PK\x03\x04"   # torch.save's format since PyTorch 1.6
PICKLE_PROTOCOL_2_PLUS = 0x80  # the first byte of a pickle of protocol >= 2 (legacy torch.save too)


def _check_file_kind(path: str) -> None:
    """CheckpointError saying what the file is when it cannot be a torch.save file: empty, text,
    or bytes that are neither a zip archive nor a pickle."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        raise CheckpointError(f"{path} is empty, not a PyTorch checkpoint")
    if head.startswith(ZIP_MAGIC) or head[0] == PICKLE_PROTOCOL_2_PLUS:
        return
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\n\r\t" for c in text):
        first = text.splitlines()[0][:40] if text.splitlines() else ""
        raise CheckpointError(f"{path} is a text file (it begins {first!r}), not a PyTorch checkpoint: "
                              "torch.save writes a zip archive")
    raise CheckpointError(f"{path} is not a PyTorch checkpoint: it is neither a zip archive written by "
                          f"torch.save nor a pickle (it begins with bytes {head[:8].hex(' ')})")


def _short(err: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _state_dict_matrices(state: Mapping) -> list[tuple[str, tuple, torch.Tensor]]:
    found = []
    for name, value in state.items():
        if (isinstance(name, str) and name.endswith("weight") and isinstance(value, torch.Tensor)
                and value.is_floating_point() and value.dim() >= 2):
            found.append((name, tuple(value.shape), value.reshape(value.shape[0], -1)))
    return found


def checkpoint_matrices(obj, path: str = "checkpoint") -> list[tuple[str, tuple, torch.Tensor]]:
    """(name, parameter shape, matrix) for every weight matrix of a loaded checkpoint object."""
    if isinstance(obj, Mapping):
        for key in CHECKPOINT_KEYS:
            if key in obj and isinstance(obj[key], (nn.Module, Mapping)):
                return checkpoint_matrices(obj[key], path)
    if isinstance(obj, nn.Module):
        return [(t.name, tuple(t.param.shape), t.matrix()) for t in tracked_matrices(obj)]
    if isinstance(obj, Mapping):
        found = _state_dict_matrices(obj)
        if found:
            return found
        keys = list(obj)[:8]
        raise CheckpointError(f"{path} holds a dict with no weight matrices (floating tensors of dim >= 2 "
                              f"named '*weight'); keys: {keys}{' ...' if len(obj) > 8 else ''}")
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a model, a state_dict or a "
                          f"checkpoint dict with one of the keys {list(CHECKPOINT_KEYS)}")


def analyze(matrices, eps: float = 1e-3, method: str = "exact", device: str = "cpu") -> list[dict]:
    """One row per matrix: name, shape and the measures of ``COLUMNS``, from one batched call."""
    if not matrices:
        raise CheckpointError("no weight matrices to analyze")
    stack = [m.detach().to(device) for _, _, m in matrices]
    kwargs = dict(k=64, adaptive=True, eps=eps) if method == "randomized" else {}
    spectra = singular_values(stack, method=method, names=[name for name, _, _ in matrices], **kwargs)
    values = all_measures(spectra, COLUMNS, eps=eps)
    rows = []
    for i, (name, shape, _) in enumerate(matrices):
        row = {"layer": name, "shape": shape}
        for col in COLUMNS:
            v = values[col][i].item()
            row[col] = int(v) if isinstance(v, int) else float(v)
        rows.append(row)
    return rows


def averages(rows: list[dict]) -> list[tuple[str, int, float]]:
    """(label, number of matrices, mean threshold rank): all matrices, and Galanti et al.'s
    ResNet-18 set when the names have 17 such layers."""
    out = [("all matrices", len(rows), sum(r["threshold_rank"] for r in rows) / len(rows))]
    try:
        subset = set(galanti_resnet18_layers([r["layer"] for r in rows]))
    except ValueError:
        subset = set()
    if len(subset) == 17:
        chosen = [r["threshold_rank"] for r in rows if r["layer"] in subset]
        out.append(("ResNet-18 stem + block convs (Galanti et al.)", 17, sum(chosen) / 17))
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lowrank_kernels.analyze",
        description="Rank measures (DESIGN.md section 2) of every weight matrix in a checkpoint.")
    parser.add_argument("checkpoint", help="torch.save(model), a state_dict, or a dict with a "
                                           "'model'/'state_dict'/'model_state_dict' entry")
    parser.add_argument("--eps", type=float, default=1e-3, help="threshold-rank cut, s_i/||W||_F > eps (default 1e-3)")
    parser.add_argument("--method", choices=("exact", "randomized"), default="exact",
                        help="exact: every singular value; randomized: adaptive top-k (default exact)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to compute (default cpu)")
    parser.add_argument("--csv", metavar="OUT", help="also write the table to this CSV file")
    parser.add_argument("--weights-only", action="store_true",
                        help="never fall back to full unpickling (refuse whole pickled models)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.eps >= 0):
        parser.error(f"--eps must be non-negative, got {args.eps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    try:
        obj = load_checkpoint(args.checkpoint, allow_pickle=not args.weights_only)
        matrices = checkpoint_matrices(obj, args.checkpoint)
        rows = analyze(matrices, args.eps, args.method, args.device)
    except CheckpointError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    except ValueError as err:  # NaN/Inf weights and the like, from the spectral code
        parser.exit(2, f"{parser.prog}: error: {args.checkpoint}: {err}\n")

    print(f"{args.checkpoint}: {len(rows)} weight {'matrix' if len(rows) == 1 else 'matrices'} ({args.method} spectra, eps={args.eps:g})")
    print(format_table(rows, ["layer", "shape", *COLUMNS]))
    for label, count, value in averages(rows):
        print(f"average threshold_rank, {label} ({count}): {value:.4f}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["layer", "shape", *COLUMNS])
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "shape": "x".join(map(str, row["shape"]))})
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
