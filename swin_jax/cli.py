"""Command line interface: ``python -m swin_jax COMMAND ...``.

Commands:

* ``predict IMAGE [IMAGE ...] [--model NAME] [--weights PATH] [--top-k K]``: classify images with a
  pretrained Swin and print the top-k classes of each.

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


def _load_model(name: str, weights: str | None) -> Any:
    """``create_model(name, pretrained=weights or True)`` with errors for people."""
    from .factory import create_model
    from .hub import CheckpointError, HubUnavailableError
    from .registry import split_model_name

    try:
        split_model_name(name)
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        return create_model(name, pretrained=weights if weights is not None else True)
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
# main
# ----------------------------------------------------------------------------------------------------------


def _add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    from .finetune import add_cli_arguments  # finetune.py imports orbax and grain only when training runs

    add_cli_arguments(parser)


def _run_finetune(args: argparse.Namespace) -> int:
    from .finetune import run_cli

    return run_cli(args)


COMMANDS: dict[str, Command] = {
    "predict": Command(
        "classify images with a pretrained Swin (top-k ImageNet classes)", _add_predict_arguments, _run_predict
    ),
    "finetune": Command(
        "fine-tune a Swin on an ImageFolder dataset (Orbax checkpoints, --resume, stops cleanly on SIGTERM)",
        _add_finetune_arguments,
        _run_finetune,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Swin Transformers in JAX / Flax NNX, numerically identical to timm."
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
