"""``vllm-dflash bench`` end to end on CPU with the tiny preset (real
acceptance: synthetic acceptance is CUDA-only in vLLM)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def test_bench_writes_table_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "vllm_dflash.cli", "bench", "--preset", "tiny"]
    cmd += ["--modes", "none,plugin", "--batch-sizes", "1,2", "--k", "7", "--tau", "0"]
    cmd += ["--prompt-len", "8", "--output-len", "16", "--enforce-eager"]
    cmd += ["--dtype", "float32", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    rows = {(r["mode"], r["batch"]): r for r in data["rows"]}
    assert set(rows) == {("none", 1), ("none", 2), ("plugin", 1), ("plugin", 2)}
    assert all(
        r["tokens"] == 16 * r["batch"] and r["tok_per_s"] > 0 for r in rows.values()
    )
    assert rows[("none", 1)]["acceptance_length"] is None
    assert rows[("plugin", 2)]["acceptance_length"] >= 1.0
    assert (out / "bench.png").stat().st_size > 1000
    assert "vs none" in proc.stdout
