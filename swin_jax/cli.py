"""Command line interface: ``python -m swin_jax COMMAND ...``.

Commands:

* ``predict IMAGE [IMAGE ...] [--model NAME] [--weights PATH] [--top-k K]``: classify images with a
  pretrained Swin and print the top-k classes of each.
* ``export NAME OUTPUT_DIR [--weights SRC | --pretrained] [--dtype bfloat16] [--platforms cpu,cuda,tpu]
  [--batch-size N] [--method forward_features] [--attn-impl NAME] [--force]``: one ``jax.export`` artifact
  (:mod:`swin_jax.export`).
* ``finetune ...``: fine-tuning (:mod:`swin_jax.finetune`).
* ``convert ...``: the weight converter (:mod:`swin_jax.convert`).

Installed as the ``swin-jax`` command (``swin-jax predict | finetune | export | convert``).

Every command is a pair ``(add its parser, run it)`` registered in :data:`COMMANDS`; ``run`` returns
the exit code. Errors meant for people (a missing image, an unknown model, no network, a bad weights
file) are raised as :class:`CLIError` (or are one of swin_jax's own checkpoint / Hub errors) and are
printed as one message without a traceback, with exit code 2, like argparse's usage errors.

Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .attention import attention_impls

__all__ = ["main", "build_parser", "CLIError", "COMMANDS", "DEFAULT_MODEL", "EXIT_ERROR"]

PROG = "python -m swin_jax"
DEFAULT_MODEL = "swin_base_patch4_window7_224.ms_in22k_ft_in1k"
EXIT_ERROR = 2  # argparse's exit code for usage errors; used for every error meant for people


class CLIError(Exception):
    """An error for people: printed as ``prog: error: message`` (no traceback), exit code 2."""


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# ----------------------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------------------


def _add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME",
        help=f"architecture or arch.tag, see swin_jax.list_models(pretrained=True) (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--weights",
        metavar="PATH",
        help="local weights instead of the Hub: a Flax checkpoint directory, a directory in timm's Hub layout "
        "(config.json + model.safetensors), a .safetensors / .bin / .pth file, or hf-hub:org/repo",
    )
    parser.add_argument(
        "--top-k",
        type=_positive_int,
        default=5,
        metavar="K",
        help="classes printed per image (at most the model's number of classes; default: 5)",
    )


def _read_images(paths: Sequence[str]) -> list[Any]:
    """Open every image as RGB (fully decoded), before any model is loaded, naming the file that fails."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except FileNotFoundError:
            raise CLIError(f"cannot read image {path}: no such file") from None
        except IsADirectoryError:
            raise CLIError(f"cannot read image {path}: it is a directory") from None
        except PermissionError:
            raise CLIError(f"cannot read image {path}: permission denied") from None
        except UnidentifiedImageError:
            raise CLIError(f"cannot read image {path}: not an image format Pillow can read") from None
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise CLIError(f"cannot read image {path}: {e}") from None
    return images


def _load_model(name: str, weights: str | None, pretrained: bool = True, **kwargs: Any) -> Any:
    """``create_model(name, pretrained=weights or pretrained, **kwargs)`` with errors for people."""
    from .factory import create_model
    from .hub import CheckpointError, HubUnavailableError
    from .registry import split_model_name

    try:
        split_model_name(name)
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        return create_model(name, pretrained=weights if weights is not None else pretrained, **kwargs)
    except HubUnavailableError as e:
        raise CLIError(f"{e}\nWith this command, pass a local checkpoint as --weights PATH.") from None
    except CheckpointError as e:
        raise CLIError(f"cannot load the weights: {e}") from None


def _class_names(num_classes: int) -> list[str]:
    from .data import imagenet_class_names

    try:
        return imagenet_class_names(num_classes)
    except ValueError:  # not an ImageNet head
        return [f"class {i}" for i in range(num_classes)]


def _run_predict(args: argparse.Namespace) -> int:
    images = _read_images(args.images)
    model = _load_model(args.model, args.weights)
    if getattr(model, "features_only", False) or not model.num_classes:
        raise CLIError(f"{args.model} with these weights has no classifier (num_classes=0): nothing to predict")

    import jax
    import numpy as np

    from .data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config(model))
    batch = []
    for path, img in zip(args.images, images):
        try:
            batch.append(transform(img))
        except ValueError as e:
            raise CLIError(f"cannot preprocess image {path}: {e}") from None
    x = np.stack(batch)

    @jax.jit
    def predict(model, x):
        return jax.nn.softmax(model(x).astype(jax.numpy.float32), axis=-1)

    probs = np.asarray(predict(model, x))
    names = _class_names(model.num_classes)
    k = min(args.top_k, model.num_classes)
    lines = []
    for path, p in zip(args.images, probs):
        lines.append(str(path))
        for i in np.argsort(-p, kind="stable")[:k]:
            lines.append(f"  {p[i]:.4f}  {names[i]}")
    print("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------


def _add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="NAME", help="architecture or arch.tag, see swin_jax.list_models()")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="directory to create: model.jaxexport + config.json")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--weights",
        metavar="SRC",
        help="local weights (Flax checkpoint, timm Hub-layout dir, .safetensors / .bin / .pth) or hf-hub:org/repo "
        "(default: random weights)",
    )
    source.add_argument("--pretrained", action="store_true", help="the tag's weights from the Hugging Face Hub")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument(
        "--platforms",
        default="cpu,cuda,tpu",
        metavar="LIST",
        help="comma-separated platforms the artifact runs on (default: cpu,cuda,tpu; no such device needed here)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=None, metavar="N", help="fixed batch size (default: symbolic)"
    )
    parser.add_argument(
        "--method",
        choices=("__call__", "forward_features"),
        default="__call__",
        help="what the artifact computes: logits (__call__, the default) or the final feature map",
    )
    parser.add_argument(
        "--attn-impl",
        choices=attention_impls(),
        default="auto",
        help="attention implementation (swin_jax.attention_impls(); a Pallas or cuDNN kernel exports for one "
        "platform at a time)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUTPUT_DIR if it exists")


def _run_export(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    out = Path(args.output_dir).expanduser()
    if out.exists() and not args.force:
        raise CLIError(f"{out} exists; choose another directory or pass --force to replace it")

    import jax.numpy as jnp

    from .export import ExportError, _check_platforms, save_export

    try:
        platforms = _check_platforms(args.platforms.split(","))
    except ExportError as e:
        raise CLIError(str(e)) from None
    model = _load_model(args.model, args.weights, pretrained=args.pretrained, dtype=jnp.dtype(args.dtype))
    model.set_attn_impl(args.attn_impl)
    if args.weights is None and not args.pretrained:
        print(f"{args._prog}: note: random weights (no --weights or --pretrained)", file=sys.stderr)
    batch = "a symbolic batch" if args.batch_size is None else f"batch {args.batch_size}"
    print(f"lowering {args.model} ({args.dtype}, {batch}) for {', '.join(platforms)} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        path = save_export(
            model,
            out,
            name=args.model,
            platforms=platforms,
            batch_size=args.batch_size,
            method=args.method,
            force=args.force,
        )
    except ExportError as e:
        raise CLIError(str(e)) from None
    size = (path / "model.jaxexport").stat().st_size
    print(f"wrote {path} (model.jaxexport {size / 1e6:.1f} MB, config.json) in {time.perf_counter() - start:.1f} s")
    return 0


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


def _add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from .finetune import add_cli_arguments  # finetune.py imports orbax and grain only when training runs

    add_cli_arguments(parser)


def _run_finetune(args: argparse.Namespace) -> int:
    from .finetune import run_cli

    return run_cli(args)


def _add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    # listed for --help; main() hands everything after "convert" to the converter's own parser
    parser.add_argument("args", nargs=argparse.REMAINDER, help="see: convert --help")


def _run_convert(args: argparse.Namespace) -> int:
    from .convert.cli import main as convert_main

    return convert_main(args.args, prog=args._prog)


COMMANDS: dict[str, Command] = {
    "predict": Command(
        "classify images with a pretrained Swin (top-k ImageNet classes)", _add_predict_arguments, _run_predict
    ),
    "export": Command(
        "export a model (weights inside) as one StableHLO artifact that jax alone loads and runs",
        _add_export_arguments,
        _run_export,
    ),
    "finetune": Command(
        "fine-tune a Swin on an ImageFolder dataset (Orbax checkpoints, --resume, stops cleanly on SIGTERM)",
        _add_finetune_arguments,
        _run_finetune,
    ),
    "convert": Command(
        "convert weights between timm (PyTorch, the Hub, Microsoft's files) and Flax, optionally --verify-ed",
        _add_convert_arguments,
        _run_convert,
    ),
}


def _prog() -> str:
    """``swin-jax`` when run as the installed command, else ``python -m swin_jax``."""
    import os

    return "swin-jax" if os.path.basename(sys.argv[0]) == "swin-jax" else PROG


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=_prog(), description="Swin Transformers in JAX / Flax NNX, numerically identical to timm."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sp = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sp)
        sp.set_defaults(_run=command.run, _prog=sp.prog)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (``sys.argv[1:]`` when None); return the exit code."""
    from .hub import CheckpointError, HubUnavailableError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:  # the converter parses its own arguments (--help included), exit codes 0 / 2 / 3
        from .convert.cli import main as convert_main

        try:
            return convert_main(argv[1:], prog=f"{_prog()} convert")
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (2) and --help (0): return the code instead of exiting
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_ERROR)
    try:
        return args._run(args)
    except (CLIError, CheckpointError, HubUnavailableError) as e:
        print(f"{args._prog}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{args._prog}: interrupted", file=sys.stderr)
        return 130
