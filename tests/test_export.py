"""Serving export: ``swin_jax.export_model`` / ``python -m swin_jax export`` give one StableHLO artifact with the
weights inside, for cpu, cuda and tpu (lowered here without those devices), that jax alone loads and runs at any
batch size with the model's output (fp32 parity 1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import assert_close, images

import swin_jax
from swin_jax.export import EXPORT_CONFIG, EXPORT_FILE, ExportError, export_model
from swin_jax.hub import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
ARCH = "swin_tiny_patch4_window7_224"
# two stages on 32 px: shifted windows of 4 on the 8x8 map, one window on the 4x4 map
TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 2), img_size=32, window_size=4, num_classes=10)

# A process where flax, swin_jax, torch and timm cannot be imported: the artifact needs jax alone.
JAX_ONLY = r"""
import importlib.abc, sys

BLOCKED = ("flax", "swin_jax", "torch", "timm", "optax", "orbax")


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is blocked in this process")
        return None


sys.meta_path.insert(0, Block())
import jax
import numpy as np

artifact, out = sys.argv[1], sys.argv[2]
exported = jax.export.deserialize(bytearray(open(artifact, "rb").read()))
results = {}
for b in (1, 3):
    x = np.load(f"{out}/x{b}.npy")
    results[f"y{b}"] = np.asarray(exported.call(x))
for name, bad in (("rank", np.zeros((32, 32, 3), np.float32)), ("size", np.zeros((1, 64, 64, 3), np.float32)),
                  ("dtype", np.zeros((1, 32, 32, 3), np.float16))):
    try:
        exported.call(bad)
        print(f"{name}: no error")
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {e}")
np.savez(f"{out}/y.npz", **results)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "swin_jax", "torch", "timm"))
print("loaded:", loaded)
"""


@pytest.fixture(scope="module")
def model():
    return swin_jax.create_model(ARCH, **TINY)


def _forward(model, x):
    return np.asarray(jax.jit(lambda m, x: m(x))(model, x))


def test_symbolic_batch_artifact_runs_with_jax_alone(model, tmp_path):
    exported = export_model(model)  # cpu, cuda and tpu
    assert exported.platforms == ("cpu", "cuda", "tpu")
    (aval,) = exported.in_avals
    assert str(aval.shape[0]) == "batch" and aval.shape[1:] == (32, 32, 3) and aval.dtype == jnp.float32
    (tmp_path / EXPORT_FILE).write_bytes(exported.serialize())
    xs = {b: images((b, 32, 32, 3), seed=b) for b in (1, 3)}
    for b, x in xs.items():
        np.save(tmp_path / f"x{b}.npy", x)
    proc = subprocess.run(
        [sys.executable, "-c", JAX_ONLY, str(tmp_path / EXPORT_FILE), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded: []" in proc.stdout
    out = np.load(tmp_path / "y.npz")
    for b, x in xs.items():
        assert out[f"y{b}"].shape == (b, 10)
        assert_close(out[f"y{b}"], _forward(model, x), what=f"batch {b}")
    # bad input is refused with a message that names what is wrong
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert "Rank mismatch" in lines["rank"] and "(batch, 32, 32, 3)" in lines["rank"]
    assert "Shape mismatch" in lines["size"] and "(1, 64, 64, 3)" in lines["size"]
    assert "Dtype mismatch" in lines["dtype"] and "float32" in lines["dtype"]


def test_fixed_batch_features_and_bf16(model):
    x = images((2, 32, 32, 3), seed=4)
    fixed = export_model(model, platforms=("cpu",), batch_size=2)
    assert fixed.in_avals[0].shape == (2, 32, 32, 3)
    assert_close(fixed.call(x), _forward(model, x))
    feats = export_model(model, platforms=["cpu"], method="forward_features")
    assert_close(feats.call(x), np.asarray(jax.jit(lambda m, x: m.forward_features(x))(model, x)), what="features")
    fo = swin_jax.create_model(ARCH, features_only=True, **{k: v for k, v in TINY.items() if k != "num_classes"})
    maps = export_model(fo, platforms=("cpu",), batch_size=2).out_avals  # lowered to the list of stage maps
    assert [m.shape for m in maps] == [(2, 8, 8, 16), (2, 4, 4, 32)]
    bf16 = swin_jax.create_model(ARCH, dtype=jnp.bfloat16, **TINY)
    exported = export_model(bf16)
    assert exported.in_avals[0].dtype == jnp.float32 and exported.out_avals[0].dtype == jnp.bfloat16
    ref = np.asarray(jax.jit(lambda m, x: m(x))(bf16, x), np.float32)
    # another compilation of a bf16 program (symbolic batch): the same function up to bf16 rounding order
    assert_close(np.asarray(exported.call(x), np.float32), ref, tol=2e-2, what="bf16 logits")


def test_train_mode_model_exports_eval_function():
    dropped = swin_jax.create_model(ARCH, drop_path_rate=0.5, **TINY)
    dropped.train()
    x = images((2, 32, 32, 3), seed=5)
    exported = export_model(dropped, platforms=("cpu",))
    a, b = exported.call(x), exported.call(x)
    np.testing.assert_array_equal(a, b)  # deterministic: no drop path in the artifact
    dropped.eval()
    assert_close(a, _forward(dropped, x))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(platforms=("cpu", "gpu")), "unknown platform"),
        (dict(platforms=()), "unknown platform"),
        (dict(batch_size=0), "batch_size"),
        (dict(method="forward_head"), "unknown method"),
    ],
)
def test_bad_export_arguments(model, kwargs, match):
    with pytest.raises(ExportError, match=match):
        export_model(model, **kwargs)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swin_jax", "export", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )


def test_cli_writes_artifact_and_config_atomically(model, tmp_path):
    weights = save_pretrained(model, tmp_path / "weights")
    out = tmp_path / "served"
    proc = _cli(ARCH, str(out), "--weights", str(weights))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lowering swin_tiny_patch4_window7_224 (float32, a symbolic batch) for cpu, cuda, tpu" in proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [EXPORT_CONFIG, EXPORT_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # ordinary permissions, not the temporary's 0700
    config = json.loads((out / EXPORT_CONFIG).read_text())
    assert config["model"] == ARCH and config["num_classes"] == 10 and config["platforms"] == ["cpu", "cuda", "tpu"]
    assert config["input_shape"] == ["batch", 32, 32, 3] and config["input_size"] == [3, 32, 32]
    assert config["mean"] == list(swin_jax.resolve_data_config(model)["mean"]) and config["interpolation"] == "bicubic"
    assert config["crop_pct"] == 0.9 and config["jax_version"] == jax.__version__
    assert config["swin_jax_version"] == swin_jax.__version__
    exported = jax.export.deserialize(bytearray((out / EXPORT_FILE).read_bytes()))
    x = images((2, 32, 32, 3), seed=6)
    assert_close(exported.call(x), _forward(model, x))

    # an existing directory is refused (and left alone) unless --force
    before = (out / EXPORT_FILE).read_bytes()
    proc = _cli(ARCH, str(out), "--weights", str(weights), "--batch-size", "4", "--platforms", "cpu")
    assert proc.returncode == 2 and "exists" in proc.stderr and "--force" in proc.stderr
    assert (out / EXPORT_FILE).read_bytes() == before
    again = ("--batch-size", "4", "--platforms", "cpu", "--attn-impl", "xla", "--force")
    proc = _cli(ARCH, str(out), "--weights", str(weights), *again)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / EXPORT_CONFIG).read_text())
    assert config["attn_impl"] == "xla"
    assert config["input_shape"] == [4, 32, 32, 3] and config["platforms"] == ["cpu"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--platforms", "cpu,gpu"], "unknown platform"),
        (["--batch-size", "0"], "expected a positive integer"),
        (["--pretrained", "--weights", "x"], "not allowed with argument"),
        (["--weights", "/no/such/dir"], "error:"),
    ],
)
def test_cli_errors(tmp_path, args, message, capsys):
    # in this process (the command's exit code 2 from a real process: test_cli_writes_artifact_and_config_atomically)
    from swin_jax.cli import main

    code = main(["export", ARCH, str(tmp_path / "out"), *args])
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr, stderr[-2000:]
    assert "Traceback" not in stderr and not (tmp_path / "out").exists()
