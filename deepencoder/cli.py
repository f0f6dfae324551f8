"""`deepencoder` console script (also `python -m deepencoder`). Thin: each command lives beside its feature and
registers itself here through an `add_parser(subparsers)` function."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command name -> module providing `add_parser(subparsers)`; the parser sets `func(args) -> int`
COMMANDS: dict[str, str] = {
    "convert": "deepencoder.conversion.cli",
    "encode": "deepencoder.pipeline.cli",
    "export-onnx": "deepencoder.export",
    "plan": "deepencoder.pipeline.plan",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepencoder", description="DeepSeek-OCR's vision tower: pages in, tokens out."
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"deepencoder {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Run from the command line (argv None) it first gives the process the fastest memory
    allocator available (`deepencoder.runtime.configure_allocator`; `DEEPENCODER_ALLOCATOR=system` keeps the
    process as started); called from Python with an argv list it leaves the process alone."""
    if argv is None:
        from .runtime import configure_allocator

        configure_allocator()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
