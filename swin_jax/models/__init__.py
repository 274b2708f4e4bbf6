"""The Swin model families, one file each as in timm, over shared window helpers and layers."""

from ._layers import reverse_mode
from ._windows import (
    calc_window_shift,
    feature_take_indices,
    relative_position_index,
    resolve_stage_window_sizes,
    shift_attn_mask,
    window_partition,
    window_reverse,
)
from .swin_transformer import SwinTransformer
from .swin_transformer_v2 import SwinTransformerV2
from .swin_transformer_v2_cr import SwinTransformerV2Cr

__all__ = [
    "SwinTransformer",
    "SwinTransformerV2",
    "SwinTransformerV2Cr",
    "calc_window_shift",
    "feature_take_indices",
    "relative_position_index",
    "resolve_stage_window_sizes",
    "reverse_mode",
    "shift_attn_mask",
    "window_partition",
    "window_reverse",
]
