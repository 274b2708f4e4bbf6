"""The research notebooks run top to bottom (offline, random weights: the notebooks' CI mode), say so
visibly, and are stored without outputs.

Run one by hand the same way: ``python tests/test_notebooks.py notebooks/01_classify.ipynb [executed.ipynb]``
(the optional second path receives the executed copy, outputs and plots included).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = ["01_classify", "02_feature_maps", "03_embeddings", "04_finetune", "05_parity"]
sys.path.insert(0, str(NOTEBOOKS))

import nbsetup  # noqa: E402

# what CI runs: random weights, and the Hub switched off so nothing can touch the network.
# One thread for torch (OpenMP) and numpy (OpenBLAS) in the kernel: the suite runs one xdist worker per core, and
# their spinning thread pools, sharing the cores with the other worker, ran ~10x slower than one thread (measured
# on a 2-core CPU: timm SwinV2-T forward 4.1 s -> 0.4 s, the SVDs of notebook 02's PCA 28 s -> 0.2 s). Results
# are unchanged up to float summation order; XLA's thread pool does not suffer from it and is left alone.
CI_ENV = {
    nbsetup.WEIGHTS_ENV: "random",
    "HF_HUB_OFFLINE": "1",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}
CELL_TIMEOUT_S = 300


def execute(path: str | os.PathLike, env: dict[str, str] | None = None) -> nbformat.NotebookNode:
    """Execute a notebook in its own folder with a fresh kernel; the executed copy is returned, the
    file is not touched."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    saved = {k: os.environ.get(k) for k in (env or CI_ENV)}
    os.environ.update(env or CI_ENV)  # the kernel inherits this process' environment
    try:
        NotebookClient(
            nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        ).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for v in out.get("data", {}).values())
    return "\n".join(parts)


def test_every_notebook_is_here():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_stored_without_outputs_and_with_one_parameter(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: outputs are not stripped"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "starts with a titled intro"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, f"{name}: needs exactly one cell tagged 'parameters' (papermill)"
    assert "WEIGHTS = nbsetup.weights_parameter()" in params[0].source
    assert "nbsetup.resolve_weights(WEIGHTS" in "".join(c.source for c in code)


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_runs_offline_and_says_random_weights(name, tmp_path):
    # the kernel's temporary files (04's work directory: data, run, timm export) go to pytest's tmp_path, which
    # pytest prunes, not to /tmp, where a notebook leaves them for its reader
    nb = execute(NOTEBOOKS / f"{name}.ipynb", env={**CI_ENV, "TMPDIR": str(tmp_path)})
    text = _text(nb)
    assert "RANDOM WEIGHTS, NOT PRETRAINED" in text, "the random-weights fallback must be said visibly"
    assert "image/png" in str([o.get("data", {}).keys() for c in nb.cells for o in c.get("outputs", [])]), "no plot"


# ----------------------------------------------------------------------------------------------------------
# the parameter itself
# ----------------------------------------------------------------------------------------------------------


def test_auto_falls_back_to_random_when_the_hub_is_off(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = nbsetup.resolve_weights("auto", "timm/swin_tiny_patch4_window7_224.ms_in1k")
    assert not weights.pretrained and "HF_HUB_OFFLINE" in weights.reason
    assert "RANDOM WEIGHTS, NOT PRETRAINED" in capsys.readouterr().out


def test_auto_falls_back_when_the_endpoint_does_not_answer(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    ok, why = nbsetup.hub_reachable("timm/x", timeout=2)
    assert not ok and "unreachable" in why


@pytest.fixture
def fake_hub(monkeypatch):
    """A local HTTP endpoint standing in for the Hub: 200 for /api/models/timm/known, 404 otherwise."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            known = self.path == "/api/models/timm/known"
            self.send_response(200 if known else 404)
            self.end_headers()
            self.wfile.write(b'{"id": "timm/known"}' if known else b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()


def test_auto_takes_pretrained_when_the_hub_answers(fake_hub, capsys):
    assert nbsetup.resolve_weights("auto", "timm/known").pretrained
    assert "PRETRAINED WEIGHTS: timm/known" in capsys.readouterr().out
    weights = nbsetup.resolve_weights("auto", "timm/unknown")
    assert not weights.pretrained and "the Hub answered 404" in weights.reason


def test_pretrained_and_random_are_taken_as_said(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert nbsetup.resolve_weights("pretrained", "timm/x").pretrained  # loading then fails with a clear error
    assert "PRETRAINED WEIGHTS: timm/x" in capsys.readouterr().out
    assert not nbsetup.resolve_weights("random", "timm/x").pretrained


def test_unknown_weights_value_is_refused():
    with pytest.raises(ValueError, match="WEIGHTS must be one of 'auto', 'pretrained', 'random', got 'imagenet'"):
        nbsetup.resolve_weights("imagenet", "timm/x")


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv(nbsetup.WEIGHTS_ENV, "random")
    assert nbsetup.weights_parameter() == "random"
    monkeypatch.delenv(nbsetup.WEIGHTS_ENV)
    assert nbsetup.weights_parameter() == "auto"


if __name__ == "__main__":
    executed = execute(sys.argv[1])
    if len(sys.argv) > 2:
        nbformat.write(executed, sys.argv[2])
    print(f"{sys.argv[1]}: ran, {len(executed.cells)} cells")
