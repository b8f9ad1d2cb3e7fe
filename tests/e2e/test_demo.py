"""``vllm-dflash demo`` runs offline, reports identical outputs, and its
trained tiny drafter is really accepted."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from vllm_dflash import tiny

pytestmark = pytest.mark.e2e


def test_demo_reports_identical_outputs(trained: tiny.TrainedPair) -> None:
    # The session's trained pair sits in the demo's cache layout: reuse it.
    env = {**os.environ, "VLLM_DFLASH_CACHE_DIR": str(trained.target.parent.parent)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_dflash.cli",
            "demo",
            "--num-prompts",
            "3",
            "--max-tokens",
            "48",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "outputs identical to plain decoding: yes" in proc.stdout
    assert "vllm_dflash.proposer.DFlashProposer" in proc.stdout
    assert str(trained.target.parent) in proc.stdout  # no second training
    tau = re.search(r"mean acceptance length: ([0-9.]+)", proc.stdout)
    assert tau is not None and float(tau.group(1)) >= 2.0, proc.stdout
