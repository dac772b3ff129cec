"""What the training-harness tests compare between two runs (an uninterrupted one and one that
was stopped and resumed): metrics without their timings, rank records, weights and momentum."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # training/ is a folder of scripts beside the installed package
    sys.path.insert(0, str(ROOT))

from training import checkpoint as ckpt  # noqa: E402
from training import train  # noqa: E402

TIMING = set(train.TIMING_FIELDS)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def without_timing(records):
    return [{k: v for k, v in rec.items() if k not in TIMING} for rec in records]


def assert_same_run(a: Path, b: Path):
    """Bit-identical results: every metric but the timings, every rank record, the final
    checkpoint's weights and momentum buffers."""
    assert without_timing(read_jsonl(a / "metrics.jsonl")) == without_timing(read_jsonl(b / "metrics.jsonl"))
    assert read_jsonl(a / "ranks.jsonl") == read_jsonl(b / "ranks.jsonl")
    pa = ckpt.load_checkpoint(ckpt.latest_checkpoint(a))
    pb = ckpt.load_checkpoint(ckpt.latest_checkpoint(b))
    for name, value in pa["model"].items():
        assert torch.equal(value, pb["model"][name]), name
    for index, state in pa["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], pb["optimizer"]["state"][index]["momentum_buffer"])
