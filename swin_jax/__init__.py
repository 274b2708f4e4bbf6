"""swin-jax: the Swin Transformer family (V1, V2, V2-CR) in JAX / Flax NNX, numerically identical to timm.

Quick use::

    import swin_jax
    model = swin_jax.create_model("swin_base_patch4_window7_224.ms_in22k_ft_in1k", pretrained=True)
    logits = model(images)  # NHWC float32 [B, 224, 224, 3], preprocessed with create_transform

This package never imports torch.
"""

from .attention import attention_impls
from .data import create_transform, imagenet_class_names, imagenet_synsets, resolve_data_config
from .export import export_model
from .factory import create_model
from .inference import CompiledForward, compile_forward
from .models import SwinTransformer, SwinTransformerV2, SwinTransformerV2Cr
from .registry import list_models
from .weights import WeightMismatchError, load_timm_state_dict, to_timm_state_dict

__version__ = "0.1.0"

__all__ = [
    "CompiledForward",
    "SwinTransformer",
    "SwinTransformerV2",
    "SwinTransformerV2Cr",
    "WeightMismatchError",
    "attention_impls",
    "compile_forward",
    "create_model",
    "create_transform",
    "export_model",
    "imagenet_class_names",
    "imagenet_synsets",
    "list_models",
    "load_timm_state_dict",
    "resolve_data_config",
    "to_timm_state_dict",
]
