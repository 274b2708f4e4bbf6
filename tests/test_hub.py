"""Pretrained loading, offline, through a real Hugging Face cache layout (tests/hub_cache.py).

Every checkpoint is a small randomized timm Swin exported with timm's own ``save_for_hf`` (config.json
records the small ``model_args``, which swin_jax must apply). The Hub-cache checks run in ONE subprocess
(huggingface_hub reads HF_HOME / HF_HUB_OFFLINE at import) in which importing torch or timm raises, so
it also proves the safetensors path never touches torch. Inputs and timm's references go through .npy
files; the local-path, adaptation and error checks run in this process against timm built the same way
(``timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=...), ...)``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import timm
import timm.data
import timm.layers
import torch
from hub_cache import add_to_hf_cache, export_timm, hub_env, python
from parity import assert_close, images, small_logit_scales_, timm_model, to_nchw

import swin_jax
from swin_jax.hub import CheckpointError, FreshHeadWarning, save_pretrained
from swin_jax.weights import resize_rel_pos_bias_table

# one xdist worker runs this module: its module-scoped fixtures are built once (pyproject: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_hub")

TINY = "swin_tiny_patch4_window7_224"
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))
CUSTOM_REPO = "someorg/somerepo"
CUSTOM_CLASSES = 37
UNCACHED = "swin_small_patch4_window7_224.ms_in22k"  # a real tag whose repo is not in the cache
V2 = "swinv2_base_window12to16_192to256.ms_in22k_ft_in1k"
CR = "swinv2_cr_small_ns_224.sw_in1k"

# key -> (timm model name, seed, extra timm kwargs, Hub repo or None, input)
EXPORTS: dict[str, tuple[str, int, dict[str, Any], str | None, str]] = {
    "t1k": (f"{TINY}.ms_in1k", 0, {}, f"timm/{TINY}.ms_in1k", "x224"),
    "t22k": (f"{TINY}.ms_in22k", 1, {}, f"timm/{TINY}.ms_in22k", "x224"),
    "b384": (
        "swin_base_patch4_window12_384.ms_in22k_ft_in1k",
        2,
        {},
        "timm/swin_base_patch4_window12_384.ms_in22k_ft_in1k",
        "x384",
    ),
    "s3": ("swin_s3_tiny_224.ms_in1k", 3, {}, "timm/swin_s3_tiny_224.ms_in1k", "x224"),
    "custom": (TINY, 4, dict(num_classes=CUSTOM_CLASSES), CUSTOM_REPO, "x224"),
    # fine-tuned at 256 with window 8: config.json's model_args carry img_size and window_size (not in the cache)
    "w8": (f"{TINY}.ms_in1k", 5, dict(img_size=256, window_size=8), None, "x256"),
    # SwinV2, window 16 at 256 with the 192-pixel pre-training windows (12, 12, 12, 6)
    "v2": (V2, 6, {}, f"timm/{V2}", "x256"),
    # SwinV2-CR, the model card's: stages named `stages`, norm3 closing each stage, no final norm
    "cr": (CR, 7, {}, f"timm/{CR}", "x224"),
}

# key -> (swin_jax name, pretrained, extra kwargs, export whose timm model is the reference)
JOBS: dict[str, tuple[str, Any, dict[str, Any], str]] = {
    "t1k": (f"{TINY}.ms_in1k", True, {}, "t1k"),
    "default_tag": (TINY, True, {}, "t1k"),  # the default tag (ms_in1k, as timm) -> the same repo
    "t22k": (f"{TINY}.ms_in22k", True, {}, "t22k"),
    "b384": ("swin_base_patch4_window12_384.ms_in22k_ft_in1k", True, {}, "b384"),
    "s3": ("swin_s3_tiny_224.ms_in1k", True, {}, "s3"),
    "custom": (TINY, f"hf-hub:{CUSTOM_REPO}", {}, "custom"),
    # local paths, also torch-free: the timm Hub-layout dir, its bare .safetensors, a Flax checkpoint
    "local_dir": (TINY, "{t1k_dir}", {}, "t1k"),
    "local_file": (TINY, "{t1k_dir}/model.safetensors", SMALL, "t1k"),
    "flax_dir": (TINY, "{flax_dir}", {}, "t1k"),
    "w8_dir": (TINY, "{w8_dir}", {}, "w8"),
    "v2": (V2, True, {}, "v2"),
    "cr": (CR, True, {}, "cr"),
    "uncached": (UNCACHED, True, {}, ""),
}

# Jobs checked by their loaded weights (bit-exact against timm's) and geometry instead of a forward pass: each
# would compile another program, and the forward of these architectures and geometries is checked against
# timm's in tests/test_model.py. The others (the cache's own tag, local paths, SwinV2 with its pre-training
# windows, which no weight or geometry shows, and SwinV2-CR) compare logits.
WEIGHTS_ONLY = ("t22k", "b384", "s3", "custom", "w8_dir")

# Runs with HF_HOME = the test cache and HF_HUB_OFFLINE=1; torch / timm imports raise (and are recorded).
CHILD = r"""
import importlib.abc
import json
import sys
from pathlib import Path

BLOCKED = ("torch", "timm", "torchvision")
attempts = []


class BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            attempts.append(fullname)
            raise ImportError(f"{fullname} is blocked in this test process")
        return None


sys.meta_path.insert(0, BlockTorch())

import jax
import numpy as np

import swin_jax
from swin_jax.data import resolve_data_config

work = Path(sys.argv[1])
spec = json.loads((work / "spec.json").read_text())
forward = jax.jit(lambda model, x: model(x))
results = {}
for key, job in spec.items():
    try:
        model = swin_jax.create_model(job["name"], pretrained=job["pretrained"], **job["kwargs"])
    except Exception as e:
        results[key] = {"error": type(e).__name__, "message": str(e)}
        continue
    if job["logits"]:
        np.save(work / f"{key}.logits.npy", np.asarray(forward(model, np.load(work / f"{job['input']}.npy"))))
    else:
        np.savez(work / f"{key}.weights.npz", **swin_jax.to_timm_state_dict(model))
    results[key] = {
        "num_classes": model.num_classes,
        "pretrained_cfg": model.pretrained_cfg,
        "data_config": resolve_data_config(model),
        "geometry": [
            [[list(map(int, b.window_size)), list(map(int, b.shift_size))] for b in stage.blocks]
            for stage in model.stage_modules
        ],
    }
results["_torch"] = {
    "attempts": attempts,
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
}
(work / "results.json").write_text(json.dumps(results, default=str))
"""


def _norm(value: Any) -> Any:
    """JSON-comparable form (tuples -> lists)."""
    return json.loads(json.dumps(value))


def _timm_logits(tm: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tm(to_nchw(x)).numpy()


def _block_geometry(model) -> list:
    return [
        [[list(map(int, b.window_size)), list(map(int, b.shift_size))] for b in stage.blocks]
        for stage in getattr(model, "layers", None) or model.stages
    ]


def _params(sd: dict[str, Any]) -> dict[str, np.ndarray]:
    """A timm state dict as numpy, without the non-persistent buffers."""
    skip = ("relative_position_index", "attn_mask")
    return {k: np.asarray(v) for k, v in sd.items() if not any(s in k for s in skip)}


def _assert_same_weights(ours: dict[str, Any], ref: dict[str, Any], skip_prefix: str | None = None) -> None:
    """Two timm-named state dicts hold the same parameters, bit for bit (``ref``'s buffers aside)."""
    ours, ref = _params(ours), _params(ref)
    if skip_prefix:
        ours = {k: v for k, v in ours.items() if not k.startswith(skip_prefix)}
        ref = {k: v for k, v in ref.items() if not k.startswith(skip_prefix)}
    assert sorted(ours) == sorted(ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


# ----------------------------------------------------------------------------------------------------------
# fixtures: timm exports, the HF cache, and the one subprocess that loads through it
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    return {
        "x224": images((2, 224, 224, 3), seed=1),
        "x256": images((1, 256, 256, 3), seed=5),
        "x384": images((1, 384, 384, 3), seed=2),
    }


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """key -> (randomized small timm model, its timm Hub-layout export dir)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for key, (name, seed, kwargs, _, _) in EXPORTS.items():
        tm = small_logit_scales_(timm_model(name, seed=seed, **SMALL, **kwargs))  # fp32 compared directly
        out[key] = (tm, export_timm(tm, root / key))
    return out


@pytest.fixture(scope="module")
def t1k(exports) -> tuple[torch.nn.Module, Path]:
    return exports["t1k"]


@pytest.fixture(scope="module")
def flax_dir(t1k, tmp_path_factory) -> Path:
    """A Flax checkpoint (save_pretrained) of the t1k weights."""
    model = swin_jax.create_model(TINY, pretrained=t1k[1])
    return save_pretrained(model, tmp_path_factory.mktemp("flax") / "swin_t_flax")


@pytest.fixture(scope="module")
def hub_run(exports, flax_dir, inputs, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    """Run every JOB in one offline, torch-blocked subprocess over a real HF cache; (results, work dir)."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    for key, (_, _, _, repo, _) in EXPORTS.items():
        if repo:
            add_to_hf_cache(hf_home, repo, exports[key][1])
    work = tmp_path_factory.mktemp("hub_run")
    for name, x in inputs.items():
        np.save(work / f"{name}.npy", x)
    paths = {"t1k_dir": str(exports["t1k"][1]), "w8_dir": str(exports["w8"][1]), "flax_dir": str(flax_dir)}
    spec = {
        key: dict(
            name=name,
            pretrained=pretrained.format(**paths) if isinstance(pretrained, str) else pretrained,
            kwargs=kwargs,
            input=EXPORTS[ref][4] if ref else "x224",
            logits=key not in WEIGHTS_ONLY,
        )
        for key, (name, pretrained, kwargs, ref) in JOBS.items()
    }
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "child.py").write_text(CHILD)
    res = subprocess.run(
        [python(), str(work / "child.py"), str(work)],
        env=hub_env(hf_home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    return json.loads((work / "results.json").read_text()), work


# ----------------------------------------------------------------------------------------------------------
# create_model(name, pretrained=True / 'hf-hub:...' / local path) through the cache, against timm
# ----------------------------------------------------------------------------------------------------------

LOADED = [k for k in JOBS if k != "uncached"]


@pytest.mark.parametrize("key", LOADED)
def test_pretrained_weights_or_logits_match_timm(hub_run, exports, inputs, key):
    results, work = hub_run
    assert "error" not in results[key], results[key]
    ref_key = JOBS[key][3]
    tm = exports[ref_key][0]
    assert results[key]["num_classes"] == tm.num_classes
    if key in WEIGHTS_ONLY:
        _assert_same_weights(dict(np.load(work / f"{key}.weights.npz")), tm.state_dict())
        return
    x = inputs[EXPORTS[ref_key][4]]
    ours = np.load(work / f"{key}.logits.npy")
    assert ours.shape == (x.shape[0], tm.num_classes)
    assert_close(ours, _timm_logits(tm, x), what=f"{key} logits")


@pytest.mark.parametrize("key", ["t1k", "default_tag", "t22k", "b384", "s3", "v2", "cr"])
def test_pretrained_cfg_and_data_config_match_the_tag(hub_run, exports, key):
    results, _ = hub_run
    name = JOBS[key][0]
    tm = exports[JOBS[key][3]][0]
    cfg = results[key]["pretrained_cfg"]
    arch, tag = tm.pretrained_cfg["architecture"], tm.pretrained_cfg["tag"]
    assert name.split(".")[0] == arch and cfg["architecture"] == arch and cfg["tag"] == tag
    assert cfg["hf_hub_id"] == f"timm/{arch}.{tag}"
    for k, v in tm.pretrained_cfg.items():
        assert _norm(cfg.get(k)) == _norm(v), f"pretrained_cfg[{k!r}]: ours {cfg.get(k)!r}, timm {v!r}"
    assert results[key]["data_config"] == _norm(timm.data.resolve_data_config(model=tm))


def test_in22k_tag_has_21841_classes(hub_run):
    results, work = hub_run
    assert results["t22k"]["num_classes"] == 21841
    assert results["t22k"]["pretrained_cfg"]["num_classes"] == 21841
    assert np.load(work / "t22k.weights.npz")["head.fc.weight"].shape[0] == 21841


def test_384_tag_small_model_args_and_window12_geometry(hub_run, exports):
    """config.json's model_args (embed_dim 32, ...) are applied; window 12 per block as timm (shift 0 at 12x12)."""
    results, _ = hub_run
    tm = exports["b384"][0]
    assert results["b384"]["geometry"] == _block_geometry(tm)
    assert results["b384"]["geometry"][0][1] == [[12, 12], [6, 6]]
    assert results["b384"]["data_config"]["input_size"] == [3, 384, 384]
    assert results["b384"]["data_config"]["crop_pct"] == 1.0


def test_checkpoint_img_size_and_window_size_are_applied(hub_run, exports):
    """A timm export at 256 / window 8 loads as such with no arguments (config.json's model_args)."""
    results, _ = hub_run
    config = json.loads((exports["w8"][1] / "config.json").read_text())
    assert config["model_args"]["window_size"] == 8 and config["model_args"]["img_size"] == [256, 256]
    assert results["w8_dir"]["geometry"] == _block_geometry(exports["w8"][0])
    assert results["w8_dir"]["data_config"]["input_size"] == [3, 256, 256]


def test_s3_geometry(hub_run, exports):
    results, _ = hub_run
    assert results["s3"]["geometry"] == _block_geometry(exports["s3"][0])


def test_swinv2_loads_with_its_pretrained_windows(hub_run, exports):
    """A SwinV2 tag through the cache: the window 16 geometry at 256 and the data config of the tag (256, crop 0.9);
    its logits match timm's (test_pretrained_weights_or_logits_match_timm), so the bias MLP's coordinates were
    normalized by the pre-training windows (12, 12, 12, 6) as timm's."""
    results, _ = hub_run
    assert results["v2"]["geometry"] == _block_geometry(exports["v2"][0])
    assert results["v2"]["geometry"][0][1] == [[16, 16], [8, 8]]
    assert results["v2"]["data_config"]["input_size"] == [3, 256, 256]
    assert results["v2"]["data_config"]["crop_pct"] == 0.9


def test_swinv2_cr_loads_with_its_ratio_windows(hub_run, exports):
    """A SwinV2-CR tag through the cache: windows 7 from window_ratio 8 at 224 (the last 7x7 stage one unshifted
    window); its logits match timm's (test_pretrained_weights_or_logits_match_timm)."""
    results, _ = hub_run
    assert results["cr"]["geometry"] == _block_geometry(exports["cr"][0])
    assert results["cr"]["geometry"][3] == [[[7, 7], [0, 0]]] * 2
    assert results["cr"]["data_config"]["input_size"] == [3, 224, 224]


def test_hf_hub_custom_repo(hub_run):
    """'hf-hub:someorg/somerepo': its config.json's num_classes (37) is used, with no fresh head."""
    results, _ = hub_run
    cfg = results["custom"]["pretrained_cfg"]
    assert results["custom"]["num_classes"] == CUSTOM_CLASSES and cfg["num_classes"] == CUSTOM_CLASSES
    assert cfg["architecture"] == TINY


def test_hf_hub_custom_repo_records_its_source(hub_run):
    """timm records where weights came from: hf-hub:org/repo gives pretrained_cfg['hf_hub_id'] == 'org/repo'."""
    cfg = hub_run[0]["custom"]["pretrained_cfg"]
    assert cfg.get("hf_hub_id") == CUSTOM_REPO, f"hf_hub_id {cfg.get('hf_hub_id')!r} for weights from {CUSTOM_REPO}"


def test_no_torch_on_the_safetensors_path(hub_run):
    """Loading (Hub tags, hf-hub:, local safetensors / Flax) and running never imports, nor tries to import, torch."""
    torch_info = hub_run[0]["_torch"]
    assert torch_info["attempts"] == [], f"import attempted: {torch_info['attempts']}"
    assert torch_info["modules"] == []


def test_offline_uncached_tag_error(hub_run):
    err = hub_run[0]["uncached"]
    assert err.get("error") == "HubUnavailableError", err
    msg = err["message"]
    assert f"timm/{UNCACHED}" in msg and "model.safetensors" in msg
    assert "offline" in msg.lower()
    assert "pretrained=" in msg and "local" in msg.lower()


# ----------------------------------------------------------------------------------------------------------
# local paths (in this process): timm Hub-layout dir, .safetensors, .pth, pytorch_model.bin dir, Flax dir
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_sources(t1k, flax_dir, tmp_path_factory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """name -> (path, create_model kwargs needed: a bare file has no config.json)."""
    tm, hub_dir = t1k
    d = tmp_path_factory.mktemp("local")
    pth = d / "swin_t.pth"
    torch.save({"model": tm.state_dict()}, pth)  # wrapped, as the original releases
    bin_dir = d / "bin_layout"
    bin_dir.mkdir()
    torch.save(tm.state_dict(), bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text((hub_dir / "config.json").read_text())
    return {
        "hub_dir": (hub_dir, {}),
        "safetensors": (hub_dir / "model.safetensors", SMALL),
        "pth": (pth, SMALL),
        "bin_dir": (bin_dir, {}),
        "flax_dir": (flax_dir, {}),
    }


@pytest.mark.parametrize("source", ["hub_dir", "safetensors", "pth", "bin_dir", "flax_dir"])
def test_local_path_loads_exact_weights(local_sources, t1k, source):
    path, kwargs = local_sources[source]
    model = swin_jax.create_model(TINY, pretrained=path, **kwargs)
    _assert_same_weights(swin_jax.to_timm_state_dict(model), t1k[0].state_dict())
    assert model.num_classes == 1000
    assert model.pretrained_cfg["architecture"] == TINY
    assert swin_jax.resolve_data_config(model) == timm.data.resolve_data_config(model=t1k[0])
    if source == "flax_dir":
        assert model.model_args == {k: tuple(v) if isinstance(v, tuple) else v for k, v in SMALL.items()}


# ----------------------------------------------------------------------------------------------------------
# loading into another configuration, as timm does
# ----------------------------------------------------------------------------------------------------------


def _timm_from_file(file: Path, **kwargs: Any) -> torch.nn.Module:
    return timm.create_model(
        TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), **SMALL, **kwargs
    ).eval()


def test_other_img_and_window_size_resizes_tables_like_timm(t1k):
    """img_size=256 / window_size=8 on a 224 / window-7 checkpoint (the dir's config says 224: explicit wins)."""
    tm, hub_dir = t1k
    model = swin_jax.create_model(TINY, pretrained=hub_dir, img_size=256, window_size=8)
    ref = _timm_from_file(hub_dir / "model.safetensors", img_size=256, window_size=8)
    assert model.img_size == (256, 256)
    assert _block_geometry(model) == _block_geometry(ref)
    table = "layers.0.blocks.0.attn.relative_position_bias_table"
    ours = swin_jax.to_timm_state_dict(model)
    assert ours[table].shape == (15 * 15, 2)
    np.testing.assert_allclose(ours[table], ref.state_dict()[table].numpy(), rtol=0, atol=1e-6)
    x = images((2, 256, 256, 3), seed=3)
    assert_close(jax.jit(lambda m, x: m(x))(model, x), _timm_logits(ref, x), what="img_size=256 logits")
    assert swin_jax.resolve_data_config(model)["input_size"] == (3, 256, 256)


@pytest.mark.parametrize(
    "src, dst, pass_src",
    [
        ((7, 7), (8, 8), False),
        ((7, 7), (12, 12), False),
        ((12, 12), (7, 7), False),
        ((7, 7), (6, 10), False),  # square source to a non-square window
        ((5, 9), (8, 8), True),  # non-square source: its window must be given
        ((6, 4), (3, 7), True),
        ((6, 4), (6, 4), False),  # inferred as the destination's: unchanged
    ],
)
def test_resize_rel_pos_bias_table_matches_timm(src, dst, pass_src):
    heads = 3
    table = np.random.default_rng(0).standard_normal(((2 * src[0] - 1) * (2 * src[1] - 1), heads)).astype(np.float32)
    new_shape = ((2 * dst[0] - 1) * (2 * dst[1] - 1), heads)
    old = src if pass_src else None
    ref = timm.layers.resize_rel_pos_bias_table(torch.from_numpy(table), dst, new_shape, old_window_size=old).numpy()
    ours = resize_rel_pos_bias_table(table, dst, old_window_size=old)
    assert ours.shape == ref.shape == new_shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_other_num_classes_warns_and_keeps_the_rest(t1k):
    tm, hub_dir = t1k
    with pytest.warns(FreshHeadWarning, match=r"head\.fc.*fine-tuning"):
        model = swin_jax.create_model(TINY, pretrained=hub_dir, num_classes=10)
    assert model.num_classes == 10
    sd = swin_jax.to_timm_state_dict(model)
    assert sd["head.fc.weight"].shape == (10, 256) and sd["head.fc.bias"].shape == (10,)
    assert np.isfinite(sd["head.fc.weight"]).all()
    _assert_same_weights(swin_jax.to_timm_state_dict(model), tm.state_dict(), skip_prefix="head.fc.")


def test_headless_file_gives_a_headless_model_not_a_random_head(t1k, tmp_path, inputs):
    tm, hub_dir = t1k
    sd = {k: v.numpy() for k, v in tm.state_dict().items() if not k.startswith("head.")}
    from safetensors.numpy import save_file

    save_file(sd, str(tmp_path / "headless.safetensors"))
    model = swin_jax.create_model(TINY, pretrained=tmp_path / "headless.safetensors", **SMALL)
    assert model.num_classes == 0 and model.get_classifier() is None
    with torch.no_grad():
        ref = tm.forward_head(tm.forward_features(to_nchw(inputs["x224"])), pre_logits=True).numpy()
    assert_close(jax.jit(lambda m, x: m(x))(model, inputs["x224"]), ref)


def test_config_contradicting_the_weights_is_an_error(t1k, tmp_path):
    _, hub_dir = t1k
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((hub_dir / "model.safetensors").read_bytes())
    config = json.loads((hub_dir / "config.json").read_text())
    config["num_classes"] = 5
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"num_classes=5.*classifier has 1000 classes"):
        swin_jax.create_model(TINY, pretrained=bad)


def test_in_chans_is_honoured_from_a_saved_checkpoint(t1k, tmp_path):
    _, hub_dir = t1k
    gray = swin_jax.create_model(TINY, pretrained=hub_dir, in_chans=1)
    saved = save_pretrained(gray, tmp_path / "gray")
    reloaded = swin_jax.create_model(TINY, pretrained=saved)  # in_chans comes from config.json
    assert reloaded.in_chans == 1
    # the same architecture and weights (the 1-channel forward: test_in_chans_1_adapts_the_stem_like_timm)
    ours = swin_jax.to_timm_state_dict(reloaded)
    assert ours["patch_embed.proj.weight"].shape[1] == 1
    _assert_same_weights(ours, swin_jax.to_timm_state_dict(gray))
    assert _block_geometry(reloaded) == _block_geometry(gray)


def test_saved_config_describes_the_saved_model(t1k, tmp_path):
    """A model loaded from a file and rebuilt at another size is saved with its own input size, and without
    the source's file path; timm reading the export resolves the same data config as swin_jax."""
    _, hub_dir = t1k
    model = swin_jax.create_model(TINY, pretrained=hub_dir, img_size=112)
    assert model.pretrained_cfg["file"]
    for fmt in ("flax", "timm"):
        saved = save_pretrained(model, tmp_path / fmt, fmt=fmt)
        cfg = json.loads((saved / "config.json").read_text())["pretrained_cfg"]
        assert cfg["input_size"] == [3, 112, 112] and "file" not in cfg and cfg["tag"] == "ms_in1k"
    tm = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True)
    assert timm.data.resolve_data_config(model=tm)["input_size"] == (3, 112, 112)
    assert swin_jax.resolve_data_config(swin_jax.create_model(TINY, pretrained=tmp_path / "flax"))["input_size"] == (
        3,
        112,
        112,
    )


def test_saved_checkpoint_has_ordinary_permissions(flax_dir):
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert flax_dir.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in flax_dir.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask


def test_headless_and_features_only_load_full_checkpoints(t1k, inputs):
    tm, hub_dir = t1k
    file = hub_dir / "model.safetensors"
    x = inputs["x224"]
    forward = jax.jit(lambda m, x: m(x))

    model = swin_jax.create_model(TINY, pretrained=hub_dir, num_classes=0)
    assert model.num_classes == 0
    with torch.no_grad():
        ref = _timm_from_file(file, num_classes=0)(to_nchw(x)).numpy()
    assert_close(forward(model, x), ref, what="num_classes=0 features")

    fmodel = swin_jax.create_model(TINY, pretrained=hub_dir, features_only=True)
    with torch.no_grad():
        refs = _timm_from_file(file, features_only=True)(to_nchw(x))
    maps = forward(fmodel, x)
    assert len(maps) == len(refs) == 4
    for i, (a, b) in enumerate(zip(maps, refs)):  # timm's Swin feature maps are NHWC too
        assert a.shape == (2, 56 >> i, 56 >> i, 32 << i)
        assert_close(a, b.numpy(), what=f"features_only stage {i}")


def test_in_chans_1_adapts_the_stem_like_timm(t1k):
    tm, hub_dir = t1k
    model = swin_jax.create_model(TINY, pretrained=hub_dir, in_chans=1)
    ref = _timm_from_file(hub_dir / "model.safetensors", in_chans=1)
    np.testing.assert_allclose(
        swin_jax.to_timm_state_dict(model)["patch_embed.proj.weight"],
        ref.state_dict()["patch_embed.proj.weight"].numpy(),
        rtol=0,
        atol=1e-6,
    )
    x = images((2, 224, 224, 1), seed=4)
    assert_close(jax.jit(lambda m, x: m(x))(model, x), _timm_logits(ref, x), what="in_chans=1 logits")


# ----------------------------------------------------------------------------------------------------------
# errors, with their messages
# ----------------------------------------------------------------------------------------------------------


def test_missing_local_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(CheckpointError, match="no such file") as e:
        swin_jax.create_model(TINY, pretrained=missing)
    assert str(missing) in str(e.value)


def test_truncated_safetensors(t1k, tmp_path):
    data = (t1k[1] / "model.safetensors").read_bytes()
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="safetensors") as e:
        swin_jax.create_model(TINY, pretrained=bad, **SMALL)
    assert str(bad) in str(e.value)


def test_checkpoint_for_another_architecture(exports):
    s3_dir = exports["s3"][1]
    with pytest.raises(CheckpointError) as e:
        swin_jax.create_model(TINY, pretrained=s3_dir)
    assert "swin_s3_tiny_224" in str(e.value) and TINY in str(e.value)


def test_weights_that_do_not_fit_list_missing_keys(t1k):
    """Swin-T weights (bare file, no config) into a Swin-S (stage 2 has 18 blocks, not 2)."""
    with pytest.raises(CheckpointError) as e:
        swin_jax.create_model(
            "swin_small_patch4_window7_224",
            pretrained=t1k[1] / "model.safetensors",
            embed_dim=32,
            num_heads=(2, 2, 4, 4),
        )
    msg = str(e.value)
    assert "missing" in msg and "layers.2.blocks.17.attn.qkv.weight" in msg and "layers.2.blocks.2.norm1.weight" in msg
    assert str(t1k[1] / "model.safetensors") in msg


class _Payload:
    """A pickle whose loading creates a marker file (as code in a malicious checkpoint would)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_not_run(t1k, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": t1k[0].state_dict(), "payload": _Payload(marker)}, evil)
    # the payload is live: an unrestricted load runs it
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="weights_only") as e:
        swin_jax.create_model(TINY, pretrained=evil, **SMALL)
    assert str(evil) in str(e.value)
    assert not marker.exists()


def test_child_process_env_is_offline(tmp_path):
    """Sanity of the harness: hub_env points huggingface_hub at the test cache, offline."""
    code = "from huggingface_hub import constants as c; print(c.HF_HUB_OFFLINE, c.HF_HUB_CACHE)"
    out = subprocess.run(
        [python(), "-c", code], env=hub_env(tmp_path), capture_output=True, text=True, timeout=120, check=True
    ).stdout.split()
    assert out == ["True", str(tmp_path / "hub")]
