"""Tests for swin_jax.finetune: exact resume, SIGTERM, final weights, data checks, metrics (tiny Swin, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from swin_jax.finetune import FinetuneError, finetune

# one xdist worker runs this module: its module-scoped fixtures are built once (pyproject: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_finetune")

REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
ARCH = "swin_tiny_patch4_window7_224"
CR = "swinv2_cr_tiny_224"
TINY = {"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "window_size": 4}
COMMON = dict(model=ARCH, img_size=32, epochs=2, batch_size=4, lr=1e-3, seed=3, **TINY)


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    skdata = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size, Image.Resampling.BILINEAR)


def _make_folder(root: Path, classes=("a", "b"), per_class: int = 4) -> Path:
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            _photo(PHOTOS[(i + c) % len(PHOTOS)], (36 + 4 * i, 40 + 2 * c)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ft_data")
    return _make_folder(root / "train", per_class=4), _make_folder(root / "val", per_class=2)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _step_losses(output: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _read_jsonl(output / "steps.jsonl")}


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory) -> tuple[Path, dict]:
    """Run A: 2 epochs x 2 steps, uninterrupted."""
    out = tmp_path_factory.mktemp("run_a")
    result = finetune(train_dir=data[0], val_dir=data[1], output=out, **COMMON)
    return out, result


def test_resume_gives_the_same_step_losses(data, full_run, tmp_path):
    out_a, result_a = full_run
    assert result_a["status"] == "completed" and result_a["step"] == 4
    stopped = finetune(train_dir=data[0], val_dir=data[1], output=tmp_path, max_steps=1, **COMMON)
    assert stopped["status"] == "stopped" and stopped["step"] == 1
    assert (tmp_path / "checkpoints" / "1").is_dir()
    with pytest.raises(FinetuneError, match="already holds checkpoints"):
        finetune(train_dir=data[0], val_dir=data[1], output=tmp_path, **COMMON)
    resumed = finetune(train_dir=data[0], val_dir=data[1], output=tmp_path, resume=True, **COMMON)
    assert resumed["status"] == "completed" and resumed["step"] == 4
    a, b = _step_losses(out_a), _step_losses(tmp_path)
    assert sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in range(1, 5)], [a[s] for s in range(1, 5)], rtol=0, atol=1e-6)
    # epoch 1's train loss (resumed mid-epoch) and the val metrics equal run A's too
    ma, mb = _read_jsonl(out_a / "metrics.jsonl"), _read_jsonl(tmp_path / "metrics.jsonl")
    for ra, rb in zip(ma, mb, strict=True):
        for k in ("loss", "val_loss", "top1", "top5"):
            assert rb[k] == pytest.approx(ra[k], abs=1e-5), k
    # keep=3 and checkpoints at epoch ends + the max_steps stop
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 4]


def test_augmentation_is_applied_recorded_and_checked(data, full_run, tmp_path):
    """Milder augmentation changes what is trained on (run A used the defaults, same seed), is part of the
    settings a resume must match, and bad values fail before anything is written."""
    mild = dict(scale=(0.5, 1.0), hflip=0.0, color_jitter=None)
    stopped = finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "mild", max_steps=1, **mild, **COMMON)
    assert stopped["status"] == "stopped"
    assert _step_losses(tmp_path / "mild")[1] != pytest.approx(_step_losses(full_run[0])[1], abs=1e-6)
    with pytest.raises(FinetuneError, match="settings differ.*augment"):
        finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "mild", resume=True, **COMMON)
    for bad, message in [
        (dict(hflip=1.5), "hflip is a probability in \\[0, 1\\], got 1.5"),
        (dict(scale=(0.9, 0.2)), "Bad scale"),
        (dict(color_jitter=-0.1), "color_jitter must be >= 0"),
        (dict(rand_augment=(2, 11)), "RandAugment magnitude must be in \\[0, 10\\]"),
    ]:
        with pytest.raises(FinetuneError, match="bad augmentation setting: " + message):
            finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "bad", **bad, **COMMON)
        assert not (tmp_path / "bad").exists()


def _params(model_dir: Path) -> dict:
    from flax import nnx

    from swin_jax import create_model

    state = nnx.state(create_model(ARCH, pretrained=str(model_dir)), nnx.Param)
    return {jax_path: np.asarray(v) for jax_path, v in nnx.to_flat_state(state)}


def test_ema_is_evaluated_checkpointed_and_saved(data, tmp_path):
    """decay 1.0 keeps the initial weights (so the EMA metrics and model_ema are those of the untrained model,
    unlike the trained one); decay 0.5 after a stop and resume equals an uninterrupted run, EMA included."""
    from flax import nnx

    from swin_jax import create_model

    frozen = finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "frozen", ema_decay=1.0, **COMMON)
    init = create_model(
        ARCH,
        num_classes=2,
        drop_path_rate=0.1,
        rngs=nnx.Rngs(COMMON["seed"]),
        **{k: v for k, v in COMMON.items() if k in ("img_size", *TINY)},
    )
    init_params = {p: np.asarray(v) for p, v in nnx.to_flat_state(nnx.state(init, nnx.Param))}
    ema_params, final_params = _params(Path(frozen["ema_model_dir"])), _params(Path(frozen["model_dir"]))
    assert ema_params.keys() == init_params.keys()
    for k in init_params:
        np.testing.assert_array_equal(ema_params[k], init_params[k], err_msg=str(k))
    assert any(not np.array_equal(final_params[k], init_params[k]) for k in init_params)
    records = _read_jsonl(tmp_path / "frozen" / "metrics.jsonl")
    assert {"ema_val_loss", "ema_top1", "ema_top5"} <= set(records[-1])
    assert records[0]["ema_val_loss"] == pytest.approx(records[-1]["ema_val_loss"], abs=1e-6)  # never moves
    assert records[-1]["ema_val_loss"] != pytest.approx(records[-1]["val_loss"], abs=1e-4)

    moving = dict(COMMON, ema_decay=0.5)
    whole = finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "whole", **moving)
    finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "resumed", max_steps=1, **moving)
    resumed = finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "resumed", resume=True, **moving)
    a, b = _params(Path(whole["ema_model_dir"])), _params(Path(resumed["ema_model_dir"]))
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=str(k))
    assert resumed["ema_top1"] == whole["ema_top1"]
    assert resumed["ema_val_loss"] == pytest.approx(whole["ema_val_loss"], abs=1e-5)


def test_mixup_cutmix_applied_and_resumed_exactly(data, full_run, tmp_path):
    """Mixup/CutMix change the training batches (run A had none, same seed), and their draws depend only on
    the seed and the step: a stopped and resumed run mixes exactly as an uninterrupted one."""
    mixed = dict(COMMON, mixup=0.8, cutmix=1.0)
    whole = tmp_path / "whole"
    finetune(train_dir=data[0], val_dir=data[1], output=whole, **mixed)
    a, ref = _step_losses(whole), _step_losses(full_run[0])
    assert all(a[s] != pytest.approx(ref[s], abs=1e-4) for s in a)
    finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "b", max_steps=1, **mixed)
    finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "b", resume=True, **mixed)
    b = _step_losses(tmp_path / "b")
    np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=0, atol=1e-6)
    with pytest.raises(FinetuneError, match="mixup and cutmix are Beta alphas >= 0"):
        finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "bad", **dict(COMMON, mixup=-1.0))
    assert not (tmp_path / "bad").exists()


def test_gradient_accumulation_equals_the_large_batch(data, tmp_path):
    """Batches of 2 accumulated over 2 steps train like batches of 4 (same images in the same order, same
    augmentation, no drop path): the validation loss after every epoch agrees."""
    base = dict(COMMON, drop_path_rate=0.0)
    finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "big", **base)
    small = dict(base, batch_size=2, grad_accum_steps=2)
    result = finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "accum", **small)
    assert result["step"] == 8  # micro-batches; 4 optimizer updates as the big run
    big, accum = _read_jsonl(tmp_path / "big" / "metrics.jsonl"), _read_jsonl(tmp_path / "accum" / "metrics.jsonl")
    assert [r["epoch"] for r in accum] == [1, 2]
    for rb, ra in zip(big, accum, strict=True):
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], abs=1e-4)
    with pytest.raises(FinetuneError, match="grad_accum_steps=3 must be >= 1 and divide the 4 batches of an epoch"):
        finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "bad", **dict(small, grad_accum_steps=3))


def test_several_steps_per_call_train_exactly_as_one(data, full_run, tmp_path, monkeypatch):
    """steps_per_call=2: each epoch's 2 steps are one call of TrainStep.run, and the step losses, the epoch
    metrics and the final weights equal run A's (one step per call) to the bit. A run stopped with one setting
    resumes with another."""
    import swin_jax.train

    calls = []
    run = swin_jax.train.TrainStep.run
    monkeypatch.setattr(swin_jax.train.TrainStep, "run", lambda self, batches: calls.append(1) or run(self, batches))
    out = tmp_path / "k2"
    result = finetune(train_dir=data[0], val_dir=data[1], output=out, steps_per_call=2, **COMMON)
    assert result["status"] == "completed" and result["step"] == 4 and len(calls) == 2
    assert _step_losses(out) == _step_losses(full_run[0])
    assert _read_jsonl(out / "metrics.jsonl") == _read_jsonl(full_run[0] / "metrics.jsonl")
    ref = _params(Path(full_run[1]["model_dir"]))
    for name, value in _params(Path(result["model_dir"])).items():
        np.testing.assert_array_equal(value, ref[name], err_msg=name)
    finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "b", max_steps=1, **COMMON)
    calls.clear()
    resumed = finetune(
        train_dir=data[0], val_dir=data[1], output=tmp_path / "b", resume=True, steps_per_call=2, **COMMON
    )
    assert resumed["step"] == 4 and len(calls) == 1  # step 2 alone (the epoch ends), then steps 3-4 in one call
    assert _step_losses(tmp_path / "b") == _step_losses(full_run[0])
    with pytest.raises(FinetuneError, match="steps_per_call must be >= 1, got 0"):
        finetune(train_dir=data[0], val_dir=data[1], output=tmp_path / "bad", steps_per_call=0, **COMMON)
    assert not (tmp_path / "bad").exists()


def test_grad_checkpointing_trains_as_without_it(data, full_run, tmp_path, monkeypatch):
    """grad_checkpointing=True recomputes every block in the backward pass (the training step's own rule, which
    saves memory on the CPU too); with drop path on (the default 0.1: the same masks), the step losses and the
    final weights equal run A's up to fp32 rounding."""
    from swin_jax.models import _layers

    calls = []
    remat = _layers._remat_block
    monkeypatch.setattr(_layers, "_remat_block", lambda *a, **kw: calls.append(1) or remat(*a, **kw))
    out = tmp_path / "ckpt"
    result = finetune(train_dir=data[0], val_dir=data[1], output=out, grad_checkpointing=True, **COMMON)
    assert result["status"] == "completed" and calls  # traced through the checkpointed blocks
    losses, ref_losses = _step_losses(out), _step_losses(full_run[0])
    assert list(losses) == list(ref_losses) == [1, 2, 3, 4]
    np.testing.assert_allclose(list(losses.values()), list(ref_losses.values()), rtol=1e-5)
    ref = _params(Path(full_run[1]["model_dir"]))
    for name, value in _params(Path(result["model_dir"])).items():
        np.testing.assert_allclose(value, ref[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_call_never_runs_past_an_epoch_end_a_checkpoint_or_max_steps():
    from types import SimpleNamespace

    from swin_jax.finetune import _call_size

    plan = SimpleNamespace(steps_per_call=8, steps_per_epoch=10, total_steps=30, save_every_steps=None, max_steps=None)
    assert [_call_size(plan, s) for s in (0, 8, 9, 10, 20, 22, 23)] == [8, 1, 1, 8, 8, 8, 1]
    plan.save_every_steps = 4  # a checkpoint every 4 steps: never 8 in a row
    assert {_call_size(plan, s) for s in range(30)} == {1}
    plan.save_every_steps, plan.max_steps = 25, 5
    assert [_call_size(plan, s) for s in (0, 5, 10, 12, 17, 20)] == [1, 1, 8, 8, 1, 1]  # max_steps 5; save at 25
    plan.steps_per_call = 1
    assert {_call_size(plan, s) for s in range(30)} == {1}


def test_metrics_and_final_weights(data, full_run):
    import jax.numpy as jnp

    from swin_jax import create_model
    from swin_jax.data import create_transform, resolve_data_config
    from swin_jax.datasets import ImageFolder
    from swin_jax.train import eval_step

    out, result = full_run
    records = _read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert {"epoch", "loss", "val_loss", "top1", "top5"} <= set(r)
        assert 0 <= r["top1"] <= r["top5"] <= 100 and np.isfinite(r["loss"])
    assert result["top1"] == records[-1]["top1"]

    model = create_model(ARCH, pretrained=str(out / "model"))
    assert model.num_classes == 2
    val = ImageFolder(data[1])
    transform = create_transform(**resolve_data_config(model))
    images = jnp.asarray(np.stack([transform(val[i][0]) for i in range(len(val))]))
    labels = jnp.asarray(val.targets)
    m = eval_step(model, (images, labels))
    assert float(m["loss"]) == pytest.approx(records[-1]["val_loss"], abs=1e-5)
    assert 100.0 * float(m["top1"]) / len(val) == pytest.approx(records[-1]["top1"])
    assert 100.0 * float(m["top5"]) / len(val) == pytest.approx(records[-1]["top5"])


def _cli(data, out, *extra, arch=ARCH):
    return [
        sys.executable, "-m", "swin_jax", "finetune", "--model", arch, "--train-dir", str(data[0]),
        "--val-dir", str(data[1]), "--img-size", "32", "--epochs", "3", "--batch-size", "4", "--lr", "1e-3",
        "--output", str(out), "--model-args", json.dumps(TINY), *extra,
    ]  # fmt: skip


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}


def test_sigterm_saves_and_resume_completes(data, tmp_path):
    """On SwinV2-CR (any family fine-tunes; the other tests use V1): SIGTERM saves, --resume completes."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cli(data, out, arch=CR), cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while not ((out / "steps.jsonl").exists() and (out / "steps.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no step logged"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["status"] == "interrupted" and 1 <= result["step"] < 6
    assert (out / "checkpoints" / str(result["step"])).is_dir()
    assert not (out / "model").exists()

    done = subprocess.run(
        _cli(data, out, "--resume", arch=CR), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.strip().splitlines()[-1])
    assert final["status"] == "completed" and final["step"] == 6
    assert json.loads((out / "model" / "config.json").read_text())["architecture"] == CR
    assert sorted(_step_losses(out)) == list(range(1, 7))


def _bad(root: Path, kind: str) -> tuple[Path, Path, list[str], str]:
    train, val = _make_folder(root / "train", per_class=2), _make_folder(root / "val", per_class=1)
    extra: list[str] = []
    if kind == "empty":
        train = root / "empty"
        train.mkdir()
        msg = "no class sub-directories"
    elif kind == "one_class":
        train = _make_folder(root / "one", classes=("a",), per_class=4)
        msg = "only 1 class"
    elif kind == "val_classes":
        val = _make_folder(root / "val2", classes=("a", "c"), per_class=1)
        msg = r"only in train: \['b'\], only in val: \['c'\]"
    elif kind == "num_classes":
        extra = ["--num-classes", "5"]
        msg = "num_classes=5 does not match"
    elif kind == "unreadable":
        (train / "b" / "broken.jpg").write_bytes(b"not a jpeg")
        msg = "1 of 5 image files are unreadable or corrupt:\n  .*broken.jpg"
    else:  # missing
        train = root / "nope"
        msg = "does not exist"
    return train, val, extra, msg


@pytest.mark.parametrize("kind", ["empty", "one_class", "val_classes", "num_classes", "unreadable", "missing"])
def test_bad_data_fails_before_building(kind, tmp_path, monkeypatch):
    import swin_jax.factory

    train, val, extra, msg = _bad(tmp_path, kind)
    out = tmp_path / "out"

    def no_model(*args, **kwargs):
        raise AssertionError("model built before the data checks")

    monkeypatch.setattr(swin_jax.factory, "create_model", no_model)
    num_classes = int(extra[1]) if extra else None
    with pytest.raises(FinetuneError, match=msg):
        finetune(train_dir=train, val_dir=val, output=out, num_classes=num_classes, **COMMON)
    assert not out.exists()


def test_cli_bad_data_exit_2(tmp_path):
    train, val, extra, _ = _bad(tmp_path, "unreadable")
    out = tmp_path / "out"
    t0 = time.monotonic()
    res = subprocess.run(
        _cli((train, val), out, *extra), cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert "finetune: error: training data: 1 of 5 image files are unreadable" in res.stderr
    assert "broken.jpg" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and time.monotonic() - t0 < 30


def test_cli_training_flags_reach_finetune(data, tmp_path, capsys):
    # the command's main in this process (a real process's exit code 2: test_cli_bad_data_exit_2)
    from swin_jax.cli import main

    out = tmp_path / "out"
    flags = ["--scale", "0.5", "1", "--hflip", "0", "--color-jitter", "0", "--rand-augment", "2", "11"]
    assert main(_cli(data, out, *flags)[3:]) == 2
    stderr = capsys.readouterr().err
    assert "finetune: error: bad augmentation setting: RandAugment magnitude must be in [0, 10], got 11.0" in stderr
    assert "Traceback" not in stderr and not out.exists()
    flags = ["--mixup", "0.8", "--cutmix", "1", "--grad-accum", "3"]
    assert main(_cli(data, out, *flags)[3:]) == 2
    stderr = capsys.readouterr().err
    assert "finetune: error: grad_accum_steps=3 must be >= 1 and divide the 2 batches of an epoch" in stderr
    assert not out.exists()


def test_cli_steps_per_call_reaches_finetune(data, tmp_path, monkeypatch, capsys):
    import swin_jax.finetune
    from swin_jax import cli

    seen = {}
    monkeypatch.setattr(swin_jax.finetune, "finetune", lambda **kw: seen.update(kw) or {"status": "completed"})
    assert cli.main(_cli(data, tmp_path / "out", "--steps-per-call", "8")[3:]) == 0
    assert seen["steps_per_call"] == 8 and seen["grad_checkpointing"] is False
    assert cli.main(_cli(data, tmp_path / "out", "--grad-checkpointing")[3:]) == 0
    assert seen["grad_checkpointing"] is True
    assert cli.main(_cli(data, tmp_path / "out", "--steps-per-call", "0")[3:]) == 2
    assert "--steps-per-call: expected a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--coordinator", "127.0.0.1:1234"], "give --coordinator, --num-processes and --process-id together"),
        (["--num-processes", "2", "--process-id", "0"], "give --coordinator, --num-processes and --process-id"),
        (["--heartbeat-timeout", "5"], "--heartbeat-timeout needs --distributed or --coordinator"),
        (
            ["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
            "distributed: the coordinator must be host:port (e.g. 10.0.0.1:1234), got 'localhost'",
        ),
        (
            ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"],
            "distributed: need 0 <= process id < number of processes, got 2 of 2",
        ),
        (["--opt-eps", "0"], "opt_eps must be > 0, got 0.0"),
    ],
)
def test_cli_multi_process_and_optimizer_flags_are_checked_before_anything_runs(data, tmp_path, capsys, flags, message):
    from swin_jax.cli import main

    out = tmp_path / "out"
    assert main(_cli(data, out, *flags)[3:]) == 2
    assert f"finetune: error: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_batch_not_divisible_by_devices_is_refused_before_building(data, tmp_path):
    cmd = [
        sys.executable, "-m", "swin_jax", "finetune", "--model", ARCH, "--train-dir", str(data[0]),
        "--val-dir", str(data[1]), "--img-size", "32", "--epochs", "1", "--batch-size", "3", "--lr", "1e-3",
        "--output", str(tmp_path / "out"), "--model-args", json.dumps(TINY),
    ]  # fmt: skip
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "batch_size=3 must be divisible by the number of devices (4)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_resume_drops_log_lines_past_its_checkpoint(tmp_path):
    """A run killed after its last checkpoint (step 3) logged steps 4-5 and epoch 2 (step 4); the resumed run
    logs them again, so the resume first drops them: every step and epoch appears once."""
    from swin_jax.finetune import METRICS_FILE, STEPS_FILE, _drop_log_lines_after

    (tmp_path / STEPS_FILE).write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps({"epoch": e, "step": 2 * e}) + "\n" for e in (1, 2)))
    _drop_log_lines_after(tmp_path, 3)
    assert [r["step"] for r in _read_jsonl(tmp_path / STEPS_FILE)] == [1, 2, 3]
    assert [r["epoch"] for r in _read_jsonl(tmp_path / METRICS_FILE)] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE, STEPS_FILE]  # no temporary left
    _drop_log_lines_after(tmp_path / "absent", 3)  # nothing logged yet: nothing to do


def test_result_step_is_the_runs_not_the_last_epochs(tmp_path, capsys):
    """Stopped at step 3 after epoch 1 ended at step 2: the result says step 3 (epoch 1.5) and carries epoch 1's
    metrics."""
    from types import SimpleNamespace

    from swin_jax.finetune import _finish

    plan = SimpleNamespace(steps_per_epoch=2, output=tmp_path)
    last = {"epoch": 1, "step": 2, "loss": 0.5, "val_loss": 0.7, "top1": 50.0, "top5": 100.0}
    result = _finish(plan, "stopped", 3, tmp_path / "checkpoints" / "3", last, None, None, True)
    assert result["step"] == 3 and result["epoch"] == 1.5 and result["status"] == "stopped"
    assert result["val_loss"] == 0.7 and result["top1"] == 50.0
    assert "stopped at step 3" in capsys.readouterr().out
