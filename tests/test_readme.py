"""The README's "Use" code runs as written: pretrained Swin-B from the (offline) Hub cache, a cat.jpg in the
working directory. The cache holds timm's own export of a Swin-B with randomized weights (tests/parity.py),
so the real download path, the loader and every call of the snippet are exercised without the network."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import skimage.data
from hub_cache import add_to_hf_cache, export_timm, hub_env, python
from parity import timm_model
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TAG = "swin_base_patch4_window7_224.ms_in22k_ft_in1k"


def _use_section_code() -> str:
    """The python blocks of the README's "## Use" section that need nothing but the model and ``cat.jpg``."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    # the bf16 example takes a batch named `images`, the training loop a `loader`
    runnable = [b for b in blocks if "images)" not in b and "loader" not in b]
    assert len(runnable) >= 3, "the Use section changed shape: update this test"
    return "\n".join(runnable)


def test_readme_use_snippet_runs_as_written(tmp_path):
    home = tmp_path / "hf_home"
    add_to_hf_cache(home, f"timm/{TAG}", export_timm(timm_model(TAG), tmp_path / "export"))
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.jpg")
    checks = """
assert [m.shape for m in maps] == [(1, 56, 56, 128), (1, 28, 28, 256), (1, 14, 14, 512), (1, 7, 7, 1024)]
assert emb.shape == (1, 1024) and emodel(x).shape == (1, 1024)
assert attn.shape == (1, 8, 8, 4, 49, 49)
assert logits.shape == (1, 1000) and float(abs(logits - model(x)).max()) < 1e-3
print("README snippet OK")
"""
    res = subprocess.run(
        [python(), "-c", _use_section_code() + checks],
        cwd=tmp_path,
        env=hub_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "README snippet OK"
    top5 = lines[:-1]
    assert len(top5) == 5 and all(re.fullmatch(r".{30} \d\.\d{3}", line) for line in top5), top5
