"""The conversion tool ``python -m convert``, run as a subprocess the way people run it (most error cases through
its ``main`` in this process: see :func:`run_main`).

Models are small (embed_dim 32) so that every conversion, ``--verify`` included, takes seconds. Bare
weight files of a non-standard configuration are converted with ``--model-args`` (the architecture
is then inferred among the registered ones with those overrides applied).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
import timm
import torch
from hub_cache import add_to_hf_cache, hub_env, ms_state_dict
from parity import FP32_REL_TOL, images, rel_err, timm_model, to_nchw
from safetensors.numpy import load_file

import swin_jax

# one xdist worker runs this module: its module-scoped fixtures are built once (pyproject: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_convert")

ROOT = Path(__file__).resolve().parents[1]
ARCH = "swin_tiny_patch4_window7_224"
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))
# tiny's depths (2, 2, 6, 2) with a small width: a bare file of it is inferred as swin_tiny with --model-args
NARROW = dict(embed_dim=32, num_heads=(1, 2, 4, 8))
NARROW_ARGS = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in NARROW.items()})
SMALL_ARGS = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in SMALL.items()})


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m convert ARGS`` from the repository root (offline unless ``env`` says otherwise)."""
    if env is None:
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "convert", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def run_main(*args: str | Path) -> subprocess.CompletedProcess:
    """``python -m convert ARGS`` as :func:`run_cli` reports it, run by the command's ``main`` in this process: for
    error tests, where a process of its own (a python + jax start each) adds nothing. A real process's exit code
    and messages stay checked by the conversions, test_existing_output_refused_then_force_replaces,
    test_malicious_pickle_is_refused_not_run and test_offline_hub_without_cache."""
    from swin_jax.convert.cli import main

    argv = list(map(str, args))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv, prog="python -m convert")
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was left behind"
    strays = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not strays, f"temporary directories left behind: {strays}"


def assert_user_error(proc: subprocess.CompletedProcess, out: Path, *fragments: str, code: int = 2) -> None:
    """One ``error:`` message (no traceback), the exit code, and nothing written."""
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, f"{fragment!r} not in:\n{proc.stderr}"
    assert_nothing_written(out)


@jax.jit
def logits_jax(model: swin_jax.SwinTransformer, x: jax.Array) -> jax.Array:
    return model(x)


def logits_timm(tmodel: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return tmodel(to_nchw(x))


class Evil:
    """A pickle that would run a shell command on load (if it were ever unpickled unsafely)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ----------------------------------------------------------------------------------------------------------
# Fixtures: the same small weights as a timm Hub-layout directory, a bare file, an MS .pth
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def tmodel() -> torch.nn.Module:
    return timm_model(ARCH, num_classes=10, **SMALL)


@pytest.fixture(scope="module")
def hub_dir(work, tmodel) -> Path:
    out = work / "timm_hub"
    timm.models.save_for_hf(tmodel, str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def converted(work, hub_dir) -> tuple[subprocess.CompletedProcess, Path]:
    out = work / "flax"
    return run_cli("timm-to-flax", hub_dir, out, "--verify"), out


@pytest.fixture(scope="module")
def narrow_model() -> torch.nn.Module:
    return timm_model(ARCH, num_classes=7, seed=1, **NARROW)


@pytest.fixture(scope="module")
def ms_pth(work, narrow_model) -> Path:
    path = work / "ms_swin.pth"
    torch.save({"model": ms_state_dict(narrow_model), "epoch": 300}, path)
    return path


@pytest.fixture()
def out(tmp_path) -> Path:
    """An output path in an empty directory (so stray temporary directories are seen)."""
    (tmp_path / "parent").mkdir()
    return tmp_path / "parent" / "out"


# ----------------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------------


def test_timm_hub_dir_to_flax_verified(converted, tmodel):
    proc, out = converted
    assert_ok(proc)
    for row in ("logits", "stage0", "stage1", "stage2", "stage3", "pre_logits", "top-5 on the photo", "PASS"):
        assert row in proc.stdout, proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "flax_model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == ARCH and config["num_classes"] == 10 and config["format"] == "swin_jax.flax"
    model = swin_jax.create_model(ARCH, pretrained=str(out))
    x = images((2, 224, 224, 3))
    assert rel_err(logits_jax(model, x), logits_timm(tmodel, x).numpy()) <= FP32_REL_TOL


def test_flax_to_timm_is_bit_exact(converted, tmodel, work):
    _, flax_dir = converted
    out = work / "back_to_timm"
    assert_ok(run_cli("flax-to-timm", flax_dir, out))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    overlay = dict(file=str(out / "model.safetensors"), num_classes=10)
    back = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=10, **SMALL).eval()
    x = images((2, 224, 224, 3), seed=1)
    assert torch.equal(logits_timm(back, x), logits_timm(tmodel, x))
    # timm also reads our config.json (architecture, num_classes, model_args) on its own
    local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert torch.equal(logits_timm(local, x), logits_timm(tmodel, x))


def test_hub_name_with_tag_from_offline_cache(tmp_path):
    tm = timm_model(f"{ARCH}.ms_in22k", num_classes=21841, seed=2, **SMALL)
    timm.models.save_for_hf(tm, str(tmp_path / "export"), safe_serialization=True)
    home = tmp_path / "hf_home"
    add_to_hf_cache(home, f"timm/{ARCH}.ms_in22k", tmp_path / "export")
    out = tmp_path / "flax"
    # (no --verify: test_timm_hub_dir_to_flax_verified covers it; the logits are compared with timm's below)
    assert_ok(run_cli("timm-to-flax", f"{ARCH}.ms_in22k", out, env=hub_env(home)))
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 21841 and config["pretrained_cfg"]["tag"] == "ms_in22k"
    model = swin_jax.create_model(ARCH, pretrained=str(out))
    x = images((1, 224, 224, 3))
    assert rel_err(logits_jax(model, x), logits_timm(tm, x).numpy()) <= FP32_REL_TOL
    # hf-hub:org/repo of any org: the architecture comes from its config.json
    add_to_hf_cache(home, "someone/small-swin", tmp_path / "export")
    assert_ok(run_cli("timm-to-flax", "hf-hub:someone/small-swin", tmp_path / "flax2", env=hub_env(home)))
    assert json.loads((tmp_path / "flax2" / "config.json").read_text())["architecture"] == ARCH
    ours, again = (load_file(str(p / "flax_model.safetensors")) for p in (out, tmp_path / "flax2"))
    assert ours.keys() == again.keys() and all(np.array_equal(ours[k], again[k]) for k in ours)


def test_microsoft_checkpoint_inferred_and_exact(ms_pth, narrow_model, work):
    sd = torch.load(ms_pth, weights_only=True)["model"]
    assert "layers.0.downsample.reduction.weight" in sd and "layers.3.downsample.reduction.weight" not in sd
    assert "head.weight" in sd and "layers.0.blocks.1.attn_mask" in sd
    assert "layers.0.blocks.0.attn.relative_position_index" in sd
    out = work / "from_ms"
    # no --model: inferred. No --verify (covered above): the logits are compared with the original timm model's
    assert_ok(run_cli("timm-to-flax", ms_pth, out, "--model-args", NARROW_ARGS))
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == ARCH and config["num_classes"] == 7
    model = swin_jax.create_model(ARCH, pretrained=str(out))
    x = images((1, 224, 224, 3), seed=3)
    assert rel_err(logits_jax(model, x), logits_timm(narrow_model, x).numpy()) <= FP32_REL_TOL


def test_existing_output_refused_then_force_replaces(hub_dir, out):
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    proc = run_cli("timm-to-flax", hub_dir, out)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "already exists" in proc.stderr
    assert "--force" in proc.stderr and (out / "keep.txt").read_text() == "mine"
    assert_ok(run_cli("timm-to-flax", hub_dir, out, "--force"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "flax_model.safetensors"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


# ----------------------------------------------------------------------------------------------------------
# Errors: one message, exit 2, nothing written
# ----------------------------------------------------------------------------------------------------------


def _truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_missing_file(out):
    proc = run_main("timm-to-flax", out.parent.parent / "nope.safetensors", out)
    assert_user_error(proc, out, "no such file", "nope.safetensors")


def test_truncated_safetensors(hub_dir, tmp_path, out):
    bad = _truncated(hub_dir / "model.safetensors", tmp_path / "bad.safetensors")
    assert_user_error(
        run_main("timm-to-flax", bad, out, "--model", ARCH), out, "bad.safetensors", "truncated or corrupt"
    )


def test_truncated_pth(ms_pth, tmp_path, out):
    bad = _truncated(ms_pth, tmp_path / "bad.pth")
    assert_user_error(run_main("timm-to-flax", bad, out, "--model", ARCH), out, "bad.pth", "truncated or corrupt")


def test_malicious_pickle_is_refused_not_run(tmp_path, out):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(1)}, "payload": Evil(marker)}, evil)
    with zipfile.ZipFile(evil) as zf:  # the pickle really calls os.system when unpickled unsafely
        assert b"system" in zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    proc = run_cli("timm-to-flax", evil, out, "--model", ARCH)
    assert_user_error(proc, out, "refused to load", "evil.pth", "weights_only=True")
    assert not marker.exists(), "the pickle's code was executed"


def test_wrong_architecture_names_the_right_one(ms_pth, out):
    args = ("--model", "swin_small_patch4_window7_224", "--model-args", NARROW_ARGS)
    proc = run_main("timm-to-flax", ms_pth, out, *args)
    assert_user_error(proc, out, "does not fit swin_small_patch4_window7_224", f"pass --model {ARCH}")


def test_wrong_architecture_for_a_hub_dir(hub_dir, out):
    proc = run_main("timm-to-flax", hub_dir, out, "--model", "swin_base_patch4_window7_224")
    assert_user_error(proc, out, f"holds weights for '{ARCH}'")


@pytest.mark.parametrize(
    "source, message",
    [("swin_tiny_patch4_window7", "Did you mean"), (f"{ARCH}.no_such_tag", "Unknown pretrained tag")],
    ids=["arch", "tag"],
)
def test_unknown_model_name(source, message, out):
    assert_user_error(run_main("timm-to-flax", source, out), out, message)


def test_offline_hub_without_cache(tmp_path, out):
    proc = run_cli("timm-to-flax", f"{ARCH}.ms_in1k", out, env=hub_env(tmp_path / "empty_hf_home"))
    assert_user_error(proc, out, f"timm/{ARCH}.ms_in1k", "offline")


@pytest.mark.parametrize(
    "model_args, message",
    [(None, "match no registered architecture"), (SMALL_ARGS, "fit 4 architectures")],
    ids=["no-match", "ambiguous"],
)
def test_architecture_cannot_be_inferred(hub_dir, model_args, message, out):
    args = ["--model-args", model_args] if model_args else []
    proc = run_main("timm-to-flax", hub_dir / "model.safetensors", out, *args)
    assert_user_error(proc, out, message, "--model")


def test_flax_to_timm_needs_a_flax_checkpoint(hub_dir, out):
    assert_user_error(run_main("flax-to-timm", hub_dir, out), out, "is not a Flax checkpoint")


def test_usage_errors(capsys, out):
    from swin_jax.convert.cli import main

    for argv in (["timm-to-flax", "x"], ["timm-to-flax", "x", str(out), "--model-args", "{bad"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert capsys.readouterr().err.startswith("error: ")
    assert_nothing_written(out)


# ----------------------------------------------------------------------------------------------------------
# --verify failing (in-process, with a perturbed model)
# ----------------------------------------------------------------------------------------------------------


def _perturb(model: swin_jax.SwinTransformer) -> swin_jax.SwinTransformer:
    bias = model.layers[2].blocks[1].mlp.fc2.bias
    bias[...] = bias[...] + 1e-3
    return model


def test_verify_tolerance_is_the_suites():
    from swin_jax.convert.verify import REL_TOL

    assert REL_TOL == FP32_REL_TOL


def test_verify_reports_a_difference(tmodel, hub_dir):
    from swin_jax.convert.verify import compare, verify_inputs

    model = swin_jax.create_model(ARCH, pretrained=str(hub_dir))
    x = verify_inputs(model)
    assert compare(model, tmodel, x).passed
    report = compare(_perturb(model), tmodel, x)
    assert not report.passed and report.max_rel > FP32_REL_TOL
    assert "FAIL" in report.table()


def test_failed_verify_exits_3_and_writes_nothing(hub_dir, out, monkeypatch, capsys):
    from swin_jax.convert import commands
    from swin_jax.convert.cli import main

    load = commands._load
    monkeypatch.setattr(commands, "_load", lambda source: _perturb(load(source)))
    assert main(["timm-to-flax", str(hub_dir), str(out), "--verify"]) == 3
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    assert captured.err.startswith("error: ") and "differs from timm" in captured.err
    assert_nothing_written(out)
