"""The converter's command line: ``swin-jax convert`` (installed), ``python -m swin_jax convert``, or
``python -m convert`` in a checkout. timm <-> Flax weight conversion for swin_jax.

Usage::

    swin-jax convert timm-to-flax SOURCE OUTPUT_DIR [--model ARCH] [--model-args JSON] [--verify] [--force]
    swin-jax convert flax-to-timm FLAX_DIR OUTPUT_DIR [--force]

Exit codes: 0 done, 2 a usage or input error (one ``error:`` message on stderr, nothing written),
3 ``--verify`` found a difference from timm (nothing written).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_USAGE = 2
EXIT_VERIFY = 3

_SOURCE_HELP = """\
a timm model name with optional tag (swin_base_patch4_window7_224.ms_in22k_ft_in1k: Hub repo timm/<name>),
hf-hub:org/repo, a directory in timm's Hub layout (config.json + model.safetensors) or a Flax checkpoint,
or one .safetensors / .bin / .pth / .pt file (timm or original Microsoft Swin layout)"""


class _Parser(argparse.ArgumentParser):
    """argparse with errors in this tool's format: ``error: ...`` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message}\n(see: {self.prog} --help)\n")


def _model_args(text: str) -> dict:
    from .sources import parse_model_args

    try:
        return parse_model_args(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


DEFAULT_PROG = "swin-jax convert"


def build_parser(prog: str = DEFAULT_PROG) -> argparse.ArgumentParser:
    """The command line (``prog``: how the user called it, for usage and help)."""
    parser = _Parser(
        prog=prog,
        description="Convert Swin Transformer weights between timm (PyTorch) and swin_jax (Flax NNX).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 done, 2 usage or input error, 3 --verify found a difference from timm",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t2f = sub.add_parser(
        "timm-to-flax",
        help="timm / Hub / original Microsoft checkpoint -> Flax checkpoint (config.json + flax_model.safetensors)",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    t2f.add_argument("source", metavar="SOURCE", help=_SOURCE_HELP)
    t2f.add_argument("output_dir", metavar="OUTPUT_DIR", help="where to write the Flax checkpoint")
    t2f.add_argument(
        "--model",
        metavar="ARCH",
        help="architecture (or arch.tag) of the weights; default: SOURCE's name, else its config.json,\n"
        "else inferred from the weights' names and shapes",
    )
    t2f.add_argument(
        "--model-args",
        metavar="JSON",
        type=_model_args,
        default={},
        help='architecture overrides for weights of a non-standard configuration, e.g.\n\'{"embed_dim": 32, '
        '"depths": [2, 2, 2, 2], "num_heads": [2, 2, 4, 4]}\' (a config.json\'s model_args are read anyway)',
    )
    t2f.add_argument(
        "--verify",
        action="store_true",
        help="compare with timm on the same weights (a photo and random inputs) before writing; exit 3 if\n"
        "any output differs by more than 1e-5 relative or the top-5 classes differ",
    )
    t2f.add_argument("--force", action="store_true", help="replace OUTPUT_DIR if it exists")
    f2t = sub.add_parser("flax-to-timm", help="Flax checkpoint -> timm's Hub layout (config.json + model.safetensors)")
    f2t.add_argument("flax_dir", metavar="FLAX_DIR", help="a Flax checkpoint written by timm-to-flax")
    f2t.add_argument("output_dir", metavar="OUTPUT_DIR", help="where to write timm's Hub layout")
    f2t.add_argument("--force", action="store_true", help="replace OUTPUT_DIR if it exists")
    return parser


def _clip(message: str, width: int = 400, detail_width: int = 160) -> str:
    """Long lines shortened to about ``width`` characters, indented detail lines (lists of keys) to ``detail_width``."""
    lines = []
    for line in str(message).strip().splitlines():
        width = detail_width if line.startswith(" ") else width
        if len(line) > width:
            cut = line[:width]
            line = (cut.rsplit(", ", 1)[0] + ", ...") if ", " in cut else cut + "..."
        lines.append(line)
    return "\n".join(lines)


def _error(message: object) -> None:
    print(f"error: {_clip(str(message))}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, prog: str = DEFAULT_PROG) -> int:
    """Run the command line; return the exit code."""
    args = build_parser(prog).parse_args(argv)
    # swin_jax (jax) is imported only now, so that usage errors are instant
    from swin_jax.hub import CheckpointError, HubUnavailableError
    from swin_jax.weights import WeightMismatchError

    from .commands import flax_to_timm, timm_to_flax
    from .verify import VerifyError

    try:
        if args.command == "timm-to-flax":
            out, _ = timm_to_flax(
                args.source,
                args.output_dir,
                model=args.model,
                model_args=args.model_args,
                verify_with_timm=args.verify,
                force=args.force,
            )
        else:
            out = flax_to_timm(args.flax_dir, args.output_dir, force=args.force)
    except VerifyError as e:
        _error(e)
        return EXIT_VERIFY
    except (CheckpointError, HubUnavailableError, WeightMismatchError, ValueError, TypeError, OSError) as e:
        _error(e)
        return EXIT_USAGE
    except ModuleNotFoundError as e:  # torch / timm for --verify: the message says what to install
        if "--verify" not in str(e):
            raise
        _error(e)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _error("interrupted; nothing was written")
        return 130
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0
