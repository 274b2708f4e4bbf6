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
import math
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
# finetune (the training itself: swin_jax.finetune)
# ----------------------------------------------------------------------------------------------------------


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value


def _add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m swin_jax finetune``."""
    parser.add_argument("--model", required=True, metavar="NAME", help="architecture or arch.tag")
    parser.add_argument(
        "--pretrained",
        metavar="SRC",
        help="initial weights: 'hub' (the tag's Hub weights), hf-hub:org/repo, or a local checkpoint path "
        "(default: random init)",
    )
    parser.add_argument("--train-dir", required=True, metavar="DIR", help="training ImageFolder (root/<class>/<img>)")
    parser.add_argument("--val-dir", required=True, metavar="DIR", help="validation ImageFolder (same classes)")
    parser.add_argument("--num-classes", type=_positive_int, metavar="N", help="default: the training classes")
    parser.add_argument("--img-size", type=_positive_int, metavar="N", help="input size (default: the model's)")
    parser.add_argument("--epochs", type=_positive_int, required=True, metavar="N")
    parser.add_argument("--batch-size", type=_positive_int, required=True, metavar="N")
    parser.add_argument("--lr", type=_non_negative_float, required=True, metavar="X", help="peak learning rate")
    parser.add_argument("--layer-decay", type=_non_negative_float, metavar="X", help="layer-wise lr decay, e.g. 0.75")
    parser.add_argument("--weight-decay", type=_non_negative_float, default=0.05, metavar="X")
    parser.add_argument("--warmup-epochs", type=int, default=0, metavar="N")
    parser.add_argument("--label-smoothing", type=_non_negative_float, default=0.1, metavar="X")
    parser.add_argument(
        "--scale",
        type=_non_negative_float,
        nargs=2,
        default=(0.08, 1.0),
        metavar=("LO", "HI"),
        help="random resized crop area range (default: 0.08 1)",
    )
    parser.add_argument("--hflip", type=_non_negative_float, default=0.5, metavar="P", help="flip probability")
    parser.add_argument(
        "--color-jitter", type=_non_negative_float, default=0.4, metavar="X", help="0 turns it off (default: 0.4)"
    )
    parser.add_argument(
        "--rand-augment",
        type=_non_negative_float,
        nargs=2,
        metavar=("OPS", "MAG"),
        help="RandAugment-lite with OPS ops at magnitude MAG in [0, 10] instead of colour jitter, e.g. 2 9",
    )
    parser.add_argument("--mixup", type=_non_negative_float, default=0.0, metavar="A", help="Mixup alpha, e.g. 0.8")
    parser.add_argument("--cutmix", type=_non_negative_float, default=0.0, metavar="A", help="CutMix alpha, e.g. 1.0")
    parser.add_argument(
        "--grad-accum", type=_positive_int, default=1, metavar="N", help="batches per optimizer update (default: 1)"
    )
    parser.add_argument(
        "--steps-per-call",
        type=_positive_int,
        default=1,
        metavar="N",
        help="training steps per call of the compiled step, same results (default: 1; 8 is faster on a CPU)",
    )
    parser.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute each block in the backward pass: less memory, about one more forward of compute",
    )
    parser.add_argument("--drop-path", type=_non_negative_float, default=0.1, metavar="X", help="stochastic depth")
    parser.add_argument("--clip-grad", type=_non_negative_float, metavar="NORM", help="clip the global gradient norm")
    parser.add_argument("--opt-eps", type=_non_negative_float, default=1e-8, metavar="EPS", help="AdamW epsilon")
    parser.add_argument("--ema-decay", type=_non_negative_float, metavar="X", help="keep an EMA of the weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True, metavar="DIR", help="checkpoints, metrics and the final model")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    parser.add_argument("--save-every", type=_positive_int, metavar="STEPS", help="default: every epoch")
    parser.add_argument("--keep", type=_positive_int, default=3, metavar="N", help="checkpoints kept (default: 3)")
    parser.add_argument("--max-steps", type=_positive_int, metavar="N", help="stop after this many steps")
    parser.add_argument("--workers", type=int, default=0, metavar="N", help="grain worker processes")
    group = parser.add_argument_group(
        "multi-process (several hosts)",
        "run the same command on every host; all three of --coordinator, --num-processes and --process-id, or "
        "--distributed alone to let JAX detect the cluster (SLURM, Cloud TPU, MPI). --batch-size is the global batch.",
    )
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    group.add_argument("--num-processes", type=_positive_int, metavar="N", help="number of processes")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's id, 0 .. N-1")
    group.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with no arguments")
    group.add_argument(
        "--heartbeat-timeout",
        type=_positive_int,
        metavar="S",
        help="seconds before the others stop when a process falls silent (default: JAX's 100)",
    )
    parser.add_argument(
        "--model-args",
        metavar="JSON",
        help='architecture overrides, e.g. \'{"embed_dim":32,"depths":[2,2],"num_heads":[2,4],"window_size":4}\'',
    )


def _run_finetune(args: argparse.Namespace) -> int:
    """Run ``python -m swin_jax finetune``; people's errors become :class:`CLIError`."""
    import json

    from .finetune import FinetuneError, finetune  # imports orbax and grain only when training runs

    overrides: dict[str, Any] = {}
    if args.model_args:
        try:
            overrides = json.loads(args.model_args)
        except json.JSONDecodeError as e:
            raise CLIError(f"--model-args is not valid JSON: {e}") from None
        if not isinstance(overrides, dict):
            raise CLIError("--model-args must be a JSON object")
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    multi = {"coordinator": args.coordinator, "num_processes": args.num_processes, "process_id": args.process_id}
    distributed: dict[str, Any] | None = None
    if any(v is not None for v in multi.values()):
        if any(v is None for v in multi.values()):
            raise CLIError("give --coordinator, --num-processes and --process-id together (or --distributed alone)")
        distributed = multi
    elif args.distributed:
        distributed = {}
    if args.heartbeat_timeout is not None:
        if distributed is None:
            raise CLIError("--heartbeat-timeout needs --distributed or --coordinator/--num-processes/--process-id")
        distributed["heartbeat_timeout_s"] = args.heartbeat_timeout
    pretrained: Any = args.pretrained if args.pretrained is not None else False
    if pretrained == "hub":
        pretrained = True
    try:
        result = finetune(
            model=args.model,
            pretrained=pretrained,
            train_dir=args.train_dir,
            val_dir=args.val_dir,
            num_classes=args.num_classes,
            img_size=args.img_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            layer_decay=args.layer_decay,
            weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs,
            label_smoothing=args.label_smoothing,
            scale=tuple(args.scale),
            hflip=args.hflip,
            color_jitter=args.color_jitter or None,
            rand_augment=None if args.rand_augment is None else (int(args.rand_augment[0]), args.rand_augment[1]),
            mixup=args.mixup,
            cutmix=args.cutmix,
            grad_accum_steps=args.grad_accum,
            steps_per_call=args.steps_per_call,
            grad_checkpointing=args.grad_checkpointing,
            drop_path_rate=args.drop_path,
            clip_grad_norm=args.clip_grad,
            opt_eps=args.opt_eps,
            ema_decay=args.ema_decay,
            seed=args.seed,
            output=args.output,
            resume=args.resume,
            save_every_steps=args.save_every,
            keep=args.keep,
            max_steps=args.max_steps,
            worker_count=args.workers,
            distributed=distributed,
            **overrides,
        )
    except FinetuneError as e:
        raise CLIError(str(e)) from None
    except TypeError as e:  # an unknown --model-args key
        if "--model-args" in str(e) or "unexpected keyword" in str(e):
            raise CLIError(f"bad --model-args: {e}") from None
        raise
    print(json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------


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
