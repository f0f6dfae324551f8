"""`python gated_encode.py GATE_DIR ENCODE_ARGS...` runs `deepencoder encode ENCODE_ARGS... --sleep-per-batch 1` with
the pause after each batch made a gate: after batch n the run writes `GATE_DIR/batch-<n>` and then waits until
`GATE_DIR/go-<n>` exists. A test acts at a known step of the run (kill it, start a second run, interrupt it) by
waiting for the file, never by guessing how long a step takes on a busy machine.

With `DEEPENCODER_GATE_PARTS=1` in the environment there is a second gate inside the writer: after the n-th part file
is written, and before its pages' manifest rows are appended, the run writes `GATE_DIR/part-<n>` and waits for
`GATE_DIR/go-part-<n>` (a kill there leaves pages on disk without rows)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from deepencoder.cli import main
from deepencoder.pipeline import runner, writer


def gate_after_each_batch(gate: Path):
    batches = 0

    def pause(seconds: float) -> None:
        nonlocal batches
        batches += 1
        (gate / f"batch-{batches}").touch()
        while not (gate / f"go-{batches}").exists():  # short sleeps: a Ctrl-C interrupts at once
            time.sleep(0.02)

    return pause


def gate_after_each_part(gate: Path):
    parts = 0
    write_pages = writer.write_pages

    def gated(*args):
        nonlocal parts
        relative = write_pages(*args)
        parts += 1
        (gate / f"part-{parts}").touch()
        while not (gate / f"go-part-{parts}").exists():
            time.sleep(0.02)
        return relative

    return gated


if __name__ == "__main__":
    # a Ctrl-C is what the tests send: take it even when started by a non-interactive shell's background job, which
    # starts its children with SIGINT ignored (Python then installs no KeyboardInterrupt handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    gate = Path(sys.argv[1])
    gate.mkdir(parents=True, exist_ok=True)
    runner.pause = gate_after_each_batch(gate)
    if os.environ.get("DEEPENCODER_GATE_PARTS") == "1":
        writer.write_pages = gate_after_each_part(gate)
    sys.exit(main(["encode", *sys.argv[2:], "--sleep-per-batch", "1"]))
