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


def test_rounds_pair_rows_of_their_own_round_and_summarize():
    """--rounds: a ratio compares rows of the same round (machine drift moves whole rounds), and the summary
    gives each ratio's median and range over the rounds."""
    part = {"device": {"backend": "cpu", "host": "h", "cpu_model": "m"}}
    rows = []
    for rnd, (jax_s, timm_s) in enumerate([(4.0, 5.0), (6.0, 5.0), (5.0, 4.0)]):
        for variant, img_s in (("jax-fp32", jax_s), ("timm-eager-fp32", timm_s)):
            rows.append({"kind": "infer", "variant": variant, "batch": 8, "img_s": img_s, "round": rnd})
    bench._finish_rows(rows, [part], None)
    assert [r["vs_timm_eager"] for r in rows if r["variant"] == "jax-fp32"] == [0.8, 1.2, 1.25]
    (ours, timm) = bench._summarize(rows)
    assert ours["rounds"] == 3 and ours["img_s"]["median"] == 5.0
    assert ours["vs_timm_eager"] == {"median": 1.2, "min": 0.8, "max": 1.25, "values": [0.8, 1.2, 1.25]}
    assert "vs_timm_eager" not in timm
    assert "| infer | jax-fp32 | 8 | 3 | 5.00 | 1.20 (0.80-1.25) |" in bench._summary_table([ours, timm])
