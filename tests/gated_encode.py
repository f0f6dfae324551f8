"""`python gated_encode.py GATE_DIR ENCODE_ARGS...` runs `deepencoder encode ENCODE_ARGS... --sleep-per-batch 1` with
the pause after each batch made a gate: after batch n the run writes `GATE_DIR/batch-<n>` and then waits until
`GATE_DIR/go-<n>` exists. A test acts at a known step of the run (kill it, start a second run, interrupt it) by
waiting for the file, never by guessing how long a step takes on a busy machine."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from deepencoder.cli import main
from deepencoder.pipeline import runner


def gate_after_each_batch(gate: Path):
    batches = 0

    def pause(seconds: float) -> None:
        nonlocal batches
        batches += 1
        (gate / f"batch-{batches}").touch()
        while not (gate / f"go-{batches}").exists():  # short sleeps: a Ctrl-C interrupts at once
            time.sleep(0.02)

    return pause


if __name__ == "__main__":
    # a Ctrl-C is what the tests send: take it even when started by a non-interactive shell's background job, which
    # starts its children with SIGINT ignored (Python then installs no KeyboardInterrupt handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    gate = Path(sys.argv[1])
    gate.mkdir(parents=True, exist_ok=True)
    runner.pause = gate_after_each_batch(gate)
    sys.exit(main(["encode", *sys.argv[2:], "--sleep-per-batch", "1"]))
