"""``vllm-dflash demo`` runs offline and reports identical outputs."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_reports_identical_outputs() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_dflash.cli",
            "demo",
            "--num-prompts",
            "3",
            "--max-tokens",
            "24",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "outputs identical to plain decoding: yes" in proc.stdout
    assert "mean acceptance length: " in proc.stdout
    assert "vllm_dflash.proposer.DFlashProposer" in proc.stdout
