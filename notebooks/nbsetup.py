"""What the swin-jax notebooks share: their one parameter, ``WEIGHTS``, and a few photos.

Every notebook has a parameters cell (tagged ``parameters`` for papermill) setting
``WEIGHTS = nbsetup.weights_parameter()``, i.e. the environment variable ``SWIN_JAX_NOTEBOOK_WEIGHTS``
or ``"auto"``:

- ``"pretrained"``: the real timm weights from the Hugging Face Hub (fails clearly without network);
- ``"random"``: randomly initialized weights, no network at all (what CI runs);
- ``"auto"``: pretrained if the Hub answers, otherwise random.

:func:`resolve_weights` turns the parameter into ``"pretrained"`` or ``"random"`` and shows which one
the notebook runs with, in a banner that cannot be missed when it is ``"random"``.
"""

from __future__ import annotations

import html
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass

import numpy as np

# tqdm's note that Jupyter widgets are missing, printed when huggingface_hub / timm import tqdm.auto: noise here
warnings.filterwarnings("ignore", message="IProgress not found")

WEIGHTS_ENV = "SWIN_JAX_NOTEBOOK_WEIGHTS"
CHOICES = ("auto", "pretrained", "random")


def weights_parameter() -> str:
    """The notebook parameter's default: ``$SWIN_JAX_NOTEBOOK_WEIGHTS``, else ``"auto"``."""
    return os.environ.get(WEIGHTS_ENV, "auto")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(repo_id: str, timeout: float = 5.0) -> tuple[bool, str]:
    """Whether the Hub answers for ``repo_id`` within ``timeout`` seconds, and if not, why."""
    if _truthy(os.environ.get("HF_HUB_OFFLINE")):
        return False, "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = f"{endpoint}/api/models/{repo_id}"
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # GET: the model card JSON, a few kB
            return True, ""
    except urllib.error.HTTPError as err:  # the Hub answered, but not with the model
        return False, f"the Hub answered {err.code} for {url}"
    except (OSError, ValueError) as err:
        return False, f"the Hugging Face Hub is unreachable ({getattr(err, 'reason', err)})"


@dataclass(frozen=True)
class Weights:
    """What a notebook runs with: ``mode`` is ``"pretrained"`` or ``"random"``."""

    mode: str
    reason: str = ""

    @property
    def pretrained(self) -> bool:
        return self.mode == "pretrained"


def resolve_weights(weights: str, repo_id: str) -> Weights:
    """Turn the ``WEIGHTS`` parameter into pretrained / random for the Hub repo ``repo_id`` and show it.

    Args:
        weights: ``"auto"``, ``"pretrained"`` or ``"random"``.
        repo_id: the Hub repo the notebook wants, e.g. ``"timm/swin_base_patch4_window7_224.ms_in22k_ft_in1k"``.

    Raises:
        ValueError: for any other ``weights``.
    """
    if weights not in CHOICES:
        raise ValueError(f"WEIGHTS must be one of {', '.join(map(repr, CHOICES))}, got {weights!r}")
    if weights == "pretrained":
        result = Weights("pretrained")
    elif weights == "random":
        result = Weights("random", f"WEIGHTS='random' (or {WEIGHTS_ENV}=random)")
    else:
        ok, why = hub_reachable(repo_id)
        result = Weights("pretrained") if ok else Weights("random", why)
    show_banner(result, repo_id)
    return result


def show_banner(weights: Weights, repo_id: str) -> None:
    """Print (and, in a notebook, display) which weights the notebook runs with."""
    if weights.pretrained:
        text = f"PRETRAINED WEIGHTS: {repo_id} from the Hugging Face Hub."
        body = f"<b>Pretrained weights</b>: <code>{html.escape(repo_id)}</code> from the Hugging Face Hub."
        style = "border:2px solid #2e7d32;background:#e8f5e9"
    else:
        text = (
            f"RANDOM WEIGHTS, NOT PRETRAINED: {weights.reason}. Everything below runs, but with randomly "
            f"initialized weights, so predictions, maps and neighbours show the mechanics, not what {repo_id} "
            "has learned. With network access, set WEIGHTS = 'pretrained' (or 'auto') and rerun."
        )
        body = (
            f"<b>RANDOM WEIGHTS, NOT PRETRAINED</b>: {html.escape(weights.reason)}.<br>Everything below runs, "
            "but with randomly initialized weights, so predictions, maps and neighbours show the mechanics, "
            f"not what <code>{html.escape(repo_id)}</code> has learned. With network access, set "
            "<code>WEIGHTS = 'pretrained'</code> (or <code>'auto'</code>) and rerun."
        )
        style = "border:3px solid #c62828;background:#ffebee"
    print(text)
    try:
        from IPython import get_ipython
        from IPython.display import HTML, display
    except ImportError:
        return
    if get_ipython() is not None:
        display(HTML(f'<div style="{style};padding:8px;font-size:110%">{body}</div>'))


# ----------------------------------------------------------------------------------------------------------
# photos (scikit-image ships them; no network)
# ----------------------------------------------------------------------------------------------------------

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "motorcycle", "camera", "clock", "coins")


def photo(name: str) -> np.ndarray:
    """A photo from ``skimage.data`` as RGB uint8 ``[H, W, 3]`` (grey photos repeated to 3 channels)."""
    import skimage.data

    img = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def photos(names: tuple[str, ...] = PHOTOS) -> dict[str, np.ndarray]:
    """Name -> RGB uint8 photo, for :data:`PHOTOS` by default."""
    return {name: photo(name) for name in names}
