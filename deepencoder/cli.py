"""`deepencoder` console script (also `python -m deepencoder`). Thin: each command lives beside its feature and
registers itself here through an `add_parser(subparsers)` function.

Start-up is part of the interface: only the invoked command's module is imported (the others are listed by name and
help line), command modules parse their arguments without importing torch or transformers, and the allocator is
chosen after parsing (never for `--help`, never by re-executing a CUDA run)."""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
from collections.abc import Iterable, Sequence

# command name -> (module providing `add_parser(subparsers)`, its help line in `deepencoder --help`); the parser
# sets `func(args) -> int`. tests/test_cli.py checks each help line against the module's own.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("deepencoder.conversion.cli", "convert a checkpoint into a DeepEncoder directory"),
    "encode": (
        "deepencoder.pipeline.cli",
        "PDFs and images -> vision tokens (one safetensors file per document + manifest.jsonl)",
    ),
    "export-onnx": (
        "deepencoder.export",
        "export the view encoder (SAM + CLIP or V2 encoder + projector) to ONNX at a fixed mode",
    ),
    "plan": (
        "deepencoder.pipeline.plan",
        "the mode `encode --mode auto` picks for each page and the total vision tokens, no model",
    ),
}


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the full sub-parser of each of `commands` (default: all) and a one-line entry for the rest
    (their modules are not imported)."""
    from . import __version__

    full = set(COMMANDS if commands is None else commands)
    parser = argparse.ArgumentParser(
        prog="deepencoder", description="DeepSeek-OCR's vision tower: pages in, tokens out."
    )
    parser.add_argument("--version", action="version", version=f"deepencoder {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_line) in COMMANDS.items():
        if name in full:
            importlib.import_module(module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_line, add_help=False)
    return parser


def invoked_command(argv: Sequence[str]) -> str | None:
    """The command `argv` names (its first argument that is not an option), or None."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMANDS else None


def cuda_run(args: argparse.Namespace) -> bool:
    """Whether the parsed command runs on a GPU (`runtime.cuda_requested` of its `--device`)."""
    from .runtime import cuda_requested

    return cuda_requested(getattr(args, "device", None))


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Run from the command line (argv None), a command that does work first gets the fastest
    memory allocator available (`deepencoder.runtime.configure_allocator`; `DEEPENCODER_ALLOCATOR=system` keeps the
    process as started): on a GPU run only glibc's in-place tuning, never a re-execution with a preloaded allocator
    (the host's allocations are few there, the start-up is not); when the command returns, the heap is frozen
    (`gc.freeze`), so the interpreter's exit does not walk every object of torch and transformers. Called from
    Python with an argv list it leaves the process alone."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = invoked_command(arguments)
    parser = build_parser([] if command is None else [command])
    args = parser.parse_args(arguments)
    if argv is None:
        from .runtime import configure_allocator

        configure_allocator(prefer=("glibc-tuned",) if cuda_run(args) else ("tcmalloc", "glibc-tuned"))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if argv is None:  # the interpreter's exit then skips walking every object of torch and transformers (0.7 s)
            gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
