"""The benchmark helpers whose results go into BENCHMARKS.md: checked here on synthetic input, so a GPU run
(which a session may get once) does not find a broken parser."""

from __future__ import annotations

import functools
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


def test_thp_rows_get_their_framework_switch_and_both_timm_ratios():
    """-thp rows: each framework's own huge-page switch in the worker's environment (glibc tunables already set are
    kept), and a swin-jax -thp row is compared with timm's default row and with timm's own -thp row."""
    assert bench.worker_env("jax-train-fp32", {}) == {}
    assert bench.worker_env("jax-train-fp32-thp", {}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert bench.worker_env("jax-fp32-thp", {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    }
    assert bench.worker_env("timm-train-eager-fp32-thp", {}) == {"THP_MEM_ALLOC_ENABLE": "1"}
    part = {"device": {"backend": "cpu", "host": "h", "cpu_model": "m"}}
    rows = [
        {"kind": "train", "variant": v, "batch": 8, "img_s": img_s}
        for v, img_s in (
            ("jax-train-fp32-thp", 1.8),
            ("timm-train-eager-fp32", 1.6),
            ("timm-train-eager-fp32-thp", 1.5),
        )
    ]
    bench._finish_rows(rows, [part], None)
    assert rows[0]["vs_timm_eager"] == pytest.approx(1.8 / 1.6)
    assert rows[0]["vs_timm_eager_thp"] == pytest.approx(1.8 / 1.5)


def test_steps_per_call_rows_are_named_parsed_and_compared_with_timms_rows():
    """-k8 rows (TrainStep.run, 8 steps per call): the worker reads N from the name, every such row is a known
    variant, and it is compared with the same timm rows as the one-step row (with huge pages, with both)."""
    assert bench.steps_per_call("jax-train-fp32-k8") == ("jax-train-fp32", 8)
    assert bench.steps_per_call("jax-train-bf16-k16") == ("jax-train-bf16", 16)
    for plain in ("jax-train-fp32", "jax-train-fp32-thp", "timm-train-eager-fp32", "jax-train-fp32-k0"):
        assert bench.steps_per_call(plain) == (plain, 1)
    for variant in bench.STEPS_EXTRA:
        base = bench.steps_per_call(variant.removesuffix("-thp"))[0]
        assert base in bench.TRAIN + bench.TRAIN_GPU
        refs = bench.REFS[variant]
        assert refs["vs_timm_eager"] == bench.REFS[base]["vs_timm_eager"]
    assert bench.worker_env("jax-train-fp32-k8-thp", {}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert bench.REFS["jax-train-fp32-k8-thp"]["vs_timm_eager_thp"] == "timm-train-eager-fp32-thp"


def test_pallas_rows_may_name_a_triton_launch():
    """``jax-bf16@pallas_fused:w2h2``: a Pallas row with its kernel's Triton launch (kernel_tune.py's names), for a
    whole-model run of a launch the kernel tuning picked. Names are checked before anything runs; the worker launches
    the kernel so (``attention.triton_tuning``, the defaults untouched) and records it (CPU: interpreted, the launch's
    heads per program)."""
    from swin_jax import attention

    assert bench.triton_launch("jax-bf16@pallas_fused:w4h2") == ("jax-bf16@pallas_fused", "w4h2")
    assert bench.triton_launch("jax-bf16") == ("jax-bf16", None)
    known = set(bench.INFER + bench.INFER_GPU + bench.ATTN_EXTRA)
    good = ["jax-bf16@pallas_fused:w4h2", "jax-train-bf16@pallas:w8h1", "jax-bf16", "jax-bf16@pallas"]
    assert bench.unknown_variants(good, known) == []
    bad = ["jax-bf16@cudnn:w4h1", "jax-bf16@pallas:4x2", "jax-bf16:w4h1", "jax-bf17@pallas:w4h1"]
    assert bench.unknown_variants(bad + good, known) == sorted(bad)
    defaults = dict(attention.TRITON_TUNING)
    row = bench._jax_worker("jax-fp32@pallas_fused:w2h2", "swin_tiny_patch4_window7_224", 1, 0, 1, 0.0)
    assert row["settings"]["triton_tuning"]["pallas_fused"] == {"num_warps": 2, "heads_per_step": 2}
    assert row["settings"]["triton_tuning"]["pallas"] == defaults["pallas"]._asdict()
    assert attention.TRITON_TUNING == defaults
    assert row["settings"]["attn_impl"] == "pallas_fused (runs pallas_fused)" and len(row["times"]) == 1


def test_tf32_emulation_rounds_default_precision_matmul_inputs_only():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tf32 import emulate_tf32, round_to_tf32

    bits = np.array([0x3F800000, 0x3F800FFF, 0x3F801000, 0x3F801001, 0x3F803000, 0xBF7FFFFF], np.uint32)
    got = np.asarray(round_to_tf32(jnp.asarray(bits.view(np.float32)))).view(np.uint32)
    # below half an ulp down, a tie to even (down), just above up, a tie to even (up), carry into the exponent
    np.testing.assert_array_equal(got, [0x3F800000, 0x3F800000, 0x3F800000, 0x3F802000, 0x3F804000, 0xBF800000])

    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal((16, 64)), jnp.float32) for _ in range(2))
    img = jnp.asarray(rng.standard_normal((1, 8, 8, 3)), jnp.float32)
    ker = jnp.asarray(rng.standard_normal((2, 2, 3, 4)), jnp.float32)
    conv = functools.partial(
        jax.lax.conv_general_dilated, window_strides=(2, 2), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

    @jax.jit
    def inner(a, b):  # a nested jit, a custom_jvp function and jax.checkpoint (remat) are followed
        gelu = jax.checkpoint(functools.partial(jax.nn.gelu, approximate=False))
        return gelu(a) @ b.T, jnp.dot(a, b.T, precision="highest")

    def fn(args):
        default, highest = inner(*args["ab"])
        return {"default": default, "highest": highest, "conv": conv(*args["conv"]), "exp": jnp.exp(args["ab"][0])}

    args = {"ab": (a, b), "conv": (img, ker)}
    got = jax.jit(emulate_tf32(fn))(args)
    with jax.default_matmul_precision("highest"):
        t = lambda x: np.asarray(round_to_tf32(x), np.float64)  # noqa: E731
        want_default = t(jax.nn.gelu(a, approximate=False)) @ t(b).T
        want_conv = np.asarray(conv(jnp.asarray(t(img), jnp.float32), jnp.asarray(t(ker), jnp.float32)))
    np.testing.assert_allclose(got["default"], want_default, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["conv"], want_conv, rtol=1e-5, atol=1e-5)
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64).T
    np.testing.assert_allclose(got["highest"], exact, rtol=1e-5, atol=1e-5)  # not rounded
    assert np.abs(np.asarray(got["default"]) - exact).max() > 1e-3  # TF32's 2^-11 per operand is visible
    np.testing.assert_array_equal(got["exp"], jnp.exp(a))
    with jax.default_matmul_precision("highest"):  # what is emulated is the default, whatever is in force
        again = jax.jit(emulate_tf32(fn))(args)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, got)


def test_lowered_ops_counts_and_the_fused_kernel_leaves_no_window_plumbing():
    """benchmarks/lowered_ops.py's parser, and what it is for: lowered for CUDA, the fused kernel's program has no
    roll (slices + concatenate), no q/k/v split and no partition/merge transposes left, where the windowed kernel's
    has all of them (a small Swin with padded, shifted stages, so one slice per block remains: a padded token's k
    and v)."""
    import lowered_ops

    line = "%3 = stablehlo.transpose %2, dims = [1, 0] : (tensor<4x8xbf16>) -> tensor<8x4xbf16> loc(#loc)"
    assert lowered_ops.count_ops(line + "\n%4 = stablehlo.add %3, %3") == {"transpose": {"count": 1, "gib": 0.0}}
    cfg = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), img_size=(64, 48), window_size=5)
    ops = {
        impl: lowered_ops.count_ops(
            lowered_ops.lowered_forward("swin_tiny_patch4_window7_224", impl, "cuda", 2, "bf16", **cfg)
        )
        for impl in ("pallas", "pallas_fused")
    }
    assert ops["pallas"]["custom_call"]["count"] == ops["pallas_fused"]["custom_call"]["count"] == 4
    assert ops["pallas"]["concatenate"]["count"] == 8 and "concatenate" not in ops["pallas_fused"]
    assert ops["pallas"]["slice"]["count"] == 36 and ops["pallas_fused"]["slice"]["count"] == 4
    assert ops["pallas_fused"]["transpose"]["count"] < ops["pallas"]["transpose"]["count"] / 4


def test_device_compile_builds_cuda_kernels_without_spills():
    """benchmarks/device_compile.py's ``triton`` command, and what it shows: both Pallas kernels of a small Swin
    (padded and shifted stages, as the CUDA path pads a head's 24 channels to 32) compile with Triton and ptxas
    for an H100/H200 (sm_90), no GPU needed, and keep everything in registers (no local memory). A jax that compiles
    the kernels while lowering (with jaxlib's own Triton) has passed the check there, and the tool reports that."""
    pytest.importorskip("triton")  # torch's dependency: installed with the dev extras
    import device_compile

    cfg = dict(embed_dim=48, depths=(2, 2), num_heads=(2, 2), img_size=(64, 48), window_size=5)
    rows = device_compile.triton_rows(
        "swin_tiny_patch4_window7_224", ("pallas", "pallas_fused"), 2, ("bf16",), 90, **cfg
    )
    if any("compiled_at_lowering" in r for r in rows):
        assert all(r["compiled_at_lowering"] >= 4 for r in rows), rows  # 4 blocks, a kernel each
        return
    kernels = {(r["impl"], r["kernel"]) for r in rows}
    assert kernels == {("pallas", "swin_window_attention"), ("pallas_fused", "swin_fused_window_attention")}
    # per implementation: stage 1 shifted or not, stage 2 (a 3x2 window grid on a 16x12 map, padded) likewise
    assert sum(r["impl"] == "pallas_fused" for r in rows) == 4, rows
    for r in rows:
        assert r["local"] == 0 and r["stack"] == 0 and 0 < r["registers"] <= 255, r
        assert 0 < r["triton_shared"] <= 228 * 1024, r  # an sm_90 block's shared memory


def test_kernel_tune_times_every_block_and_launch_and_checks_each_against_einsum(tmp_path):
    """benchmarks/kernel_tune.py on the CPU (kernels interpreted): a row per distinct block (here a padded, shifted
    stage: two geometries) and variant, each launch's output equal to the einsum path's, the model's estimate
    weighting each block by its count; malformed launches refused before anything runs."""
    import kernel_tune
    from flax import nnx

    import swin_jax

    cfg = dict(embed_dim=32, depths=(3,), num_heads=(2,), img_size=(36, 28), window_size=4, num_classes=3)
    model = swin_jax.create_model("swin_tiny_patch4_window7_224", **cfg, rngs=nnx.Rngs(0))
    rows = kernel_tune.tune_rows(model, 1, ["einsum", "pallas_fused"], ["w4h1", "w2h2"], repeats=1, warmup=0)
    assert [(r["variant"], r["shift"], r["count"]) for r in rows] == [
        (v, shift, count)
        for shift, count in (([0, 0], 2), ([2, 2], 1))
        for v in ("einsum", "pallas_fused:w4h1", "pallas_fused:w2h2")
    ]
    for r in rows:
        assert r["size"] == [9, 7] and r["heads"] == 2 and r["ms"] > 0 and "error" not in r, r
        assert r["rel_err_vs_einsum"] < 1e-6, r
    summary = {s["variant"]: s for s in kernel_tune.summarize(rows, batch=1)}
    einsum = [r["ms"] for r in rows if r["variant"] == "einsum"]
    assert summary["einsum"]["model_ms"] == pytest.approx(2 * einsum[0] + einsum[1], abs=2e-3)
    assert set(summary) == {"einsum", "pallas_fused:w4h1", "pallas_fused:w2h2"}
    for spec in ("w0h1", "4x1", "w4"):
        with pytest.raises(ValueError, match="a Triton launch is w<num_warps>h<heads per program>"):
            kernel_tune.parse_tuning(spec)


@pytest.mark.parametrize(
    "platform, needs", [("tpu", r"libtpu==0\.0\.\d+"), ("cuda", r"jax-cuda13-plugin\[with-cuda\]==0\.\d+")]
)
def test_device_compile_without_the_compiler_says_how_to_get_it(monkeypatch, platform, needs):
    """The ``tpu`` and ``cuda`` commands need a compiler jax does not install by default: named, at the version this
    jax pins, with the venv to put it in."""
    import device_compile

    monkeypatch.setattr(device_compile.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=rf'(?s)needs .*pip install "{needs}.*JAX_PLATFORMS=cpu'):
        device_compile.compile_rows(platform, "v5e:2x2", ["swin_tiny_patch4_window7_224"], ["einsum"], 2, "bf16", False)


def test_device_compile_kernel_traffic_reads_the_entry_computation():
    """device_compile.kernel_traffic: each top-level kernel of ENTRY reads its operands and writes its result; views,
    tuples and parameters launch nothing; nested computations are not counted again."""
    import device_compile

    hlo = """HloModule m

%fused (p: f32[8,4]) -> f32[8,4] {
  %p = f32[8,4]{1,0} parameter(0)
  ROOT %e = f32[8,4]{1,0} exponential(%p)
}

ENTRY %main (x: f32[8,4], w: bf16[4,2]) -> bf16[8,2] {
  %x = f32[8,4]{1,0} parameter(0)
  %w = bf16[4,2]{1,0} parameter(1)
  %f = f32[8,4]{1,0} fusion(%x), kind=kLoop, calls=%fused, metadata={op_name="a(b), c"}
  %v = bf16[32]{0} bitcast(%w)
  %g = (bf16[8,2]{1,0}, s8[16]{0}) custom-call(%f, %w), custom_call_target="__cublas$lt$matmul"
  ROOT %r = bf16[8,2]{1,0} get-tuple-element(%g), index=0
}
"""
    assert device_compile.kernel_traffic(hlo) == {
        "fusion:kLoop": 128 + 128,  # f32[8,4] in and out
        "custom-call:__cublas$lt$matmul": (32 + 16) + 128 + 16,  # its tuple result, f, w
    }
