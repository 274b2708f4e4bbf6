"""Multi-process fine-tuning with real processes on one machine: 2 processes x 2 simulated CPU devices (gloo
collectives over 127.0.0.1, ``python -m swin_jax finetune --coordinator ... --num-processes 2 --process-id I``);
a SIGKILLed process stops the other within the heartbeat timeout, ``--resume`` on both continues from the last
checkpoint, and the run (before the kill and after the resume) trains exactly as 1 process x 4 devices."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from parity import FP32_REL_TOL, adamw_divergence_bound
from safetensors.numpy import load_file
from test_finetune import ARCH, TINY, _make_folder, _read_jsonl, _step_losses

from swin_jax.train import create_schedule

# one xdist worker runs this module: its module-scoped fixtures are built once (pyproject: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_multihost")

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, STEPS_PER_EPOCH, LR, EPS = 4, 2, 1e-3, 1e-3
HEARTBEAT_S = 10
# a process whose peer died exits within the heartbeat timeout (measured ~HEARTBEAT_S + 0.1 s); the rest is
# slack for a loaded 2-core machine
STOP_BOUND_S = HEARTBEAT_S + 25


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mh_data")
    return _make_folder(root / "train", per_class=4), _make_folder(root / "val", per_class=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(data, out: Path, processes: int, *extra: str) -> list[subprocess.Popen]:
    """Start the finetune command as ``processes`` processes with 4 / processes CPU devices each."""
    cmd = [
        sys.executable, "-m", "swin_jax", "finetune", "--model", ARCH, "--train-dir", str(data[0]),
        "--val-dir", str(data[1]), "--img-size", "32", "--epochs", str(EPOCHS), "--batch-size", "4",
        "--lr", str(LR), "--opt-eps", str(EPS), "--seed", "3", "--output", str(out), "--model-args", json.dumps(TINY),
        *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={4 // processes}",
    }
    if processes == 1:
        return [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    port = _free_port()
    multi = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
    return [
        subprocess.Popen(
            [*cmd, *multi, "--process-id", str(i), "--heartbeat-timeout", str(HEARTBEAT_S)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, out, err))
    return results


def _assert_completed(results) -> None:
    for i, (rc, out, err) in enumerate(results):
        assert rc == 0, f"process {i}: exit {rc}\n{err[-3000:]}"
        assert json.loads(out.strip().splitlines()[-1])["status"] == "completed"


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> Path:
    """The reference: 1 process with 4 devices, uninterrupted."""
    out = tmp_path_factory.mktemp("one_process")
    _assert_completed(_finish(_launch(data, out, 1)))
    return out


def _adam_grad_scale(run: Path, steps: int) -> dict[str, float]:
    """Per parameter: a bound on every gradient element of the run, from Adam's second moment at the end
    (``nu_T >= (1 - b2) b2^(T-t) g_t^2``, so ``|g_t| <= sqrt(max nu_T / ((1 - b2) b2^(T-1)))``)."""
    path = (run / "checkpoints" / str(steps) / "opt").resolve()
    checkpointer = ocp.StandardCheckpointer()
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # saved on 4 devices, read on this process's one
    target = {
        k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here)
        for k, m in checkpointer.metadata(path).item_metadata.items()
    }
    b2 = 0.999
    scale = {}
    for key, value in checkpointer.restore(path, target).items():
        parts = key.split("/")  # opt_state/<i>/nu/<NNX path>
        if "nu" in parts:
            scale[".".join(parts[parts.index("nu") + 1 :])] = float(
                np.sqrt(np.max(np.asarray(value)) / ((1 - b2) * b2 ** (steps - 1)))
            )
    return scale


def _weights_problems(run: Path, ref: Path) -> list[str]:
    """Final weights of ``run`` against ``ref`` within :func:`parity.adamw_divergence_bound`, each step's gradient
    noise taken at the gradient parity tolerance (``FP32_REL_TOL`` x the gradient scale; the 8-device test measures
    it, ~1e-9 absolute against a 1e-5 tolerance). No weight decay term is needed beyond the largest (0.05)."""
    steps = EPOCHS * STEPS_PER_EPOCH
    schedule = create_schedule(lr=LR, total_steps=steps)
    lrs = [float(schedule(t)) for t in range(steps)]
    scale = _adam_grad_scale(ref, steps)
    a, b = load_file(run / "model" / "flax_model.safetensors"), load_file(ref / "model" / "flax_model.safetensors")
    assert a.keys() == b.keys() and set(scale) == set(b), (sorted(set(scale) ^ set(b)))[:5]
    problems = []
    for name in b:
        bound = adamw_divergence_bound(
            [FP32_REL_TOL * scale[name]] * steps, lrs, eps=EPS, weight_decay=0.05, param_max=np.abs(b[name]).max()
        )
        diff = float(np.abs(a[name].astype(np.float64) - b[name]).max())
        if diff > bound:
            problems.append(f"{name}: {diff:.3e} > {bound:.3e}")
    return problems


def test_killed_process_stops_the_others_and_resume_continues(data, one_process, tmp_path):
    out = tmp_path / "killed"
    procs = _launch(data, out, 2)  # a checkpoint at every epoch end (2 steps)
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "2").is_dir():  # orbax renames a finished checkpoint into place
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _finish(procs, 5)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        procs[0].wait(timeout=STOP_BOUND_S + 30)
    finally:
        (rc0, _, err0), (rc1, _, _) = _finish(procs, 30)
    stopped_after = time.monotonic() - killed_at
    assert rc1 == -signal.SIGKILL
    assert rc0 != 0, "the surviving process finished as if nothing happened"
    assert stopped_after <= STOP_BOUND_S, f"the surviving process took {stopped_after:.1f} s to stop"
    assert "JAX distributed service detected fatal errors" in err0, err0[-3000:]
    done = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert 2 <= done < EPOCHS * STEPS_PER_EPOCH
    assert not (out / "model").exists()
    logged_steps = len(_read_jsonl(out / "steps.jsonl"))

    # resumed 2 steps per call (each epoch one TrainStep.run on batches stacked from both processes' shards)
    results = _finish(_launch(data, out, 2, "--resume", "--steps-per-call", "2"))
    _assert_completed(results)
    assert f"resuming from {out / 'checkpoints'}/" in results[0][1]
    # 2 processes x 2 devices (steps 1..done before the kill, the rest resumed) train as 1 process x 4 devices
    ref, got = _step_losses(one_process), _step_losses(out)
    assert sorted(got) == sorted(ref) == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    np.testing.assert_allclose([got[s] for s in sorted(ref)], [ref[s] for s in sorted(ref)], rtol=FP32_REL_TOL)
    assert _weights_problems(out, one_process) == []
    # the resumed run drops what the killed one logged past its checkpoint and logs once (process 0 alone):
    # every step and epoch one line
    assert [r["step"] for r in _read_jsonl(out / "steps.jsonl")] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert [r["epoch"] for r in _read_jsonl(out / "metrics.jsonl")] == list(range(1, EPOCHS + 1))
    resumed_epochs = _read_jsonl(out / "metrics.jsonl")[done // STEPS_PER_EPOCH :]
    assert logged_steps >= done  # the killed run had logged up to its checkpoint (or past it)
    ref_val = {r["epoch"]: r["val_loss"] for r in _read_jsonl(one_process / "metrics.jsonl")}
    for r in resumed_epochs:
        assert r["val_loss"] == pytest.approx(ref_val[r["epoch"]], rel=1e-5)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "metrics.jsonl", "model", "steps.jsonl"]
