"""`benchmarks/pipeline.py` in a small setting: one command writes its input, measures every rate and writes the
JSON report and the plot (here with the tower bounded to one view per pass and the forward on one thread, and the
command itself timed in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pipeline_benchmark_small(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "benchmarks.pipeline", "--pages", "4", "--modes", "tiny", "--batch-size", "2",
               "--workers", "1", "--device", "cpu", "--views-per-call", "1", "--threads", "1",
               "--command", "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "pipeline-cpu-near-free-views1.json").read_text())
    assert report["pages"] == 4 and report["device"] == "cpu" and list(report["modes"]) == ["tiny"]
    assert report["views_per_call"] == 1 and report["threads"] == 1
    rates = report["modes"]["tiny"]
    for key in ("end_to_end_pages_per_s", "feed_only_pages_per_s", "tower_only_pages_per_s", "first_batch_s"):
        assert rates[key] > 0, key
    # the command itself (a fresh `deepencoder encode`, its summary's page count checked by the benchmark): its first
    # batch is written after its imports and before it exits
    assert 0 < rates["command_first_batch_s"] < rates["command_total_s"] and rates["command_pages_per_s"] > 0
    assert (tmp_path / "pipeline-cpu-near-free-views1.png").stat().st_size > 0
