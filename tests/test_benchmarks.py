"""The benchmark helpers whose results go into BENCHMARKS.md: checked here on synthetic input, so a GPU run
(which a session may get once) does not find a broken parser."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench  # noqa: E402


def _trace(tmp_path: Path, events: list[dict]) -> Path:
    run = tmp_path / "plugins" / "profile" / "2026_11_28"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    return tmp_path


def test_device_busy_unions_kernels_on_device_tracks(tmp_path):
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
    ]
    kernels = [  # two streams overlapping on 10-30 us, a gap 40-60 us; host events ignored
        {"ph": "X", "pid": 7, "tid": 1, "ts": 0, "dur": 30, "name": "a"},
        {"ph": "X", "pid": 7, "tid": 2, "ts": 10, "dur": 30, "name": "b"},
        {"ph": "X", "pid": 7, "tid": 1, "ts": 60, "dur": 40, "name": "c"},
        {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 1000, "name": "python"},
    ]
    got = bench.device_busy(_trace(tmp_path, meta + kernels))
    assert got["busy_ms"] == pytest.approx(0.080)  # [0, 40] + [60, 100]
    assert got["span_ms"] == pytest.approx(0.100)
    assert got["busy_fraction"] == pytest.approx(0.8)


def test_device_busy_is_none_without_a_device(tmp_path):
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}}]
    assert bench.device_busy(_trace(tmp_path, meta + [{"ph": "X", "pid": 1, "ts": 0, "dur": 5}])) is None
    assert bench.device_busy(tmp_path / "empty") is None
