"""``vllm-dflash bench`` end to end on CPU with the tiny preset. Real
acceptance (``--tau 0``): vLLM's CPU stand-ins of the rejection kernels
assert that synthetic mode is off (``vllm/utils/cpu_triton_utils.py``), so a
synthetic profile cannot run here; ``--acceptance decay`` is still parsed and
recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_dflash import bench
from vllm_dflash.bench import BenchRow, paired_ratio

pytestmark = pytest.mark.e2e


def test_bench_writes_table_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "vllm_dflash.cli", "bench", "--preset", "tiny"]
    cmd += ["--modes", "none,plugin-k3,adaptive", "--batch-sizes", "1,2"]
    cmd += ["--k", "7", "--tau", "0", "--acceptance", "decay"]
    cmd += ["--prompt-len", "8", "--output-len", "16", "--long-output-len", "40"]
    cmd += ["--enforce-eager", "--repeats", "2", "--step-log", "--engine-arg", "seed=0"]
    cmd += ["--dtype", "float32", "--out", str(out)]
    # In-process engine cores: CPU vLLM otherwise gives the worker its own
    # process, away from the scheduler's adaptive policy the bench reads.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    rows = {(r["mode"], r["batch"]): r for r in data["rows"]}
    modes = ("none", "plugin-k3", "adaptive")
    assert list(rows) == [(m, b) for b in (1, 2) for m in modes]
    # Two timed passes per batch: tokens and seconds over both, the rate the
    # median of the two (their mean).
    for r in rows.values():
        assert r["tokens"] == 2 * 16 * r["batch"], r
        rates = r["pass_tok_per_s"]
        assert len(rates) == 2 and min(rates) > 0
        assert r["tok_per_s"] == pytest.approx(sum(rates) / 2)
    assert rows[("none", 1)]["acceptance_length"] is None
    assert [rows[(m, 1)]["k"] for m in modes] == [0, 3, 7]
    # At most K drafts accepted per step: 1 <= tau <= K + 1.
    assert 1.0 <= rows[("plugin-k3", 2)]["acceptance_length"] <= 4.0
    # The adaptive rows say which K their steps ran (the policy lives in the
    # engine-core process; the bench reads it through collective_rpc). On
    # this CPU the policy may settle on K = 0 (no drafts, no tau) after the
    # warm-up; tau is there only if some step drafted.
    for b in (1, 2):
        row = rows[("adaptive", b)]
        policy = row["adaptive"]
        assert set(policy["steps_per_k"]) <= {"0", "1", "3", "7"}
        assert sum(policy["steps_per_k"].values()) > 0
        # The trace holds the timed run's decisions in order, no more.
        assert sum(run[3] for run in policy["trace"]) == sum(
            policy["steps_per_k"].values()
        )
        assert len(policy["conditional_acceptance"]) == 7
        # CPU vLLM's V1 engine schedules without async scheduling here: a
        # step is its host part plus its model's, so the policy leaves the
        # host's wait alone and every K is estimated from its intervals.
        assert policy["overlapped"] is False
        assert policy["step_host_ms"] == {} and policy["gpu_bound_buckets"] == []
        drafted = any(k != "0" for k in policy["steps_per_k"])
        if row["acceptance_length"] is not None:
            assert drafted and 1.0 <= row["acceptance_length"] <= 8.0
            assert 0.0 < row["drafts_per_request_step"] <= 7.0
    # Every plugin engine's passes carry their step clock: the steps of the
    # pass after its first output, in less time than the pass, and the
    # stalls (steps over 3x the recent median) among them.
    for (mode, b), row in rows.items():
        clocks = row["pass_clock"]
        if mode == "none":
            assert clocks == []
            continue
        assert len(clocks) == 2, (mode, b)
        for clock, rate in zip(clocks, row["pass_tok_per_s"], strict=True):
            assert 0 < clock["steps"] < 16 and 0 < clock["busy_s"] < 16 * b / rate
            for step, batch, k, ms, _wait in clock["stalls"]:
                assert 1 <= step <= clock["steps"] and 1 <= batch <= b
                assert 0 <= k <= 7 and 0 < ms <= 1e3 * clock["busy_s"]
            # --step-log: every step of the pass, in order, its stalls among
            # them, their intervals adding up to the pass's busy time.
            log = clock["log"]
            assert [entry[0] for entry in log] == list(range(1, clock["steps"] + 1))
            assert all(entry in [e[:5] for e in log] for entry in clock["stalls"])
            # The drafter runs in the scheduler's process here, so a step
            # that drafted has a host wait, inside its interval; a fixed K
            # drafts every step (adaptive's K 0 steps skip the drafter).
            for _, _, _, ms, wait, cpu_ms in log:
                assert wait is None or 0 <= wait <= ms
                assert cpu_ms >= 0
            if mode != "adaptive":
                assert all(entry[4] is not None for entry in log), (mode, log)
            assert sum(entry[3] for entry in log) == pytest.approx(
                1e3 * clock["busy_s"], abs=1e-3 * len(log)
            )
            assert {entry[2] for entry in log} <= (
                {3} if mode == "plugin-k3" else {0, 1, 3, 7}
            )
    # The step table: every fixed-K step timed its wait here, so each has a
    # host part, inside its interval.
    split = {(s["mode"], s["batch"], s["k"]): s for s in data["step_split"]}
    for b in (1, 2):
        fixed = split["plugin-k3", b, 3]
        assert fixed["waited_steps"] == fixed["steps"] > 0
        assert 0 < fixed["host_ms"] <= fixed["ms"] and 0 <= fixed["gpu_bound"] <= 1
    assert {mode for mode, _, _ in split} == {"plugin-k3", "adaptive"}
    assert "host ms" in proc.stdout
    # Every pass records the host's CPU time and context switches over it;
    # the engine core runs in this process here (no multiprocessing), so
    # both readings are this process's, taken a moment apart.
    for row in rows.values():
        hosts = row["pass_host"]
        assert len(hosts) == 2
        for host in hosts:
            assert host["engine_cpu_s"] > 0 and host["front_cpu_s"] > 0
            assert host["engine_cpu_s"] == pytest.approx(host["front_cpu_s"], abs=0.05)
            assert min(host.values()) >= 0
    # vLLM's JIT monitor never starts in these eager CPU engines: every row
    # says so (None), where a CUDA engine's would list its late compiles.
    assert all(row["jit_compiles"] is None for row in rows.values())
    assert rows[("plugin-k3", 1)]["adaptive"] is None
    assert rows[("plugin-k3", 1)]["drafts_per_request_step"] == 3.0
    # Every row keeps its untimed full-batch warm-up's rate.
    assert all(r["warmup_tok_per_s"] > 0 for r in rows.values())
    # Greedy with real acceptance, the same prompts in every engine: every
    # mode's passes generated the tokens no speculation did.
    for b in (1, 2):
        digests = {m: rows[(m, b)]["pass_output_digest"] for m in modes}
        assert len(digests["none"]) == 2 and len(set(digests["none"])) == 2
        assert all(d == digests["none"] for d in digests.values()), digests
    meta = data["meta"]
    assert meta["acceptance"] == "decay" and meta["synthetic"] is False
    assert meta["engine_args"] == {"seed": 0}
    assert meta["capture_sizes"] == [1, 2, 4, 8, 16]
    assert [s["best_fixed"] for s in data["summary"]] == ["plugin-k3"] * 2
    # One mode after the other: no pass-by-pass ratio.
    assert all(s["adaptive_vs_best_fixed_paired"] is None for s in data["summary"])
    assert all(s["adaptive_vs_none"] > 0 for s in data["summary"])
    # The long single request (--long-output-len) runs in every engine.
    long = {r["mode"]: r for r in data["long_rows"]}
    assert list(long) == list(modes)
    assert all(r["batch"] == 1 and r["tokens"] == 40 for r in long.values())
    assert all(len(r["pass_tok_per_s"]) == 1 for r in long.values())
    assert meta["long_output_len"] == 40 and meta["repeats"] == 2
    assert (out / "bench.png").stat().st_size > 1000
    table = proc.stdout
    assert "vs none" in table and "adaptive/best" in table
    assert all(f" {m} " in table for m in modes)


def test_interleaved_modes_alternate_passes_on_identical_prompts(
    tmp_path: Path,
) -> None:
    """``--interleave``: three engines up at once (each in its own worker
    process), their timed passes taken in turn (A B C, B C A, C A B), batch
    by batch. ``dynamic-k3`` (vLLM's dynamic-K path held at K 3 of 7)
    verifies exactly 3 drafts a step, as ``plugin-k3`` does."""
    out = tmp_path / "bench"
    modes = ["none", "plugin-k3", "dynamic-k3"]
    cmd = [sys.executable, "-m", "vllm_dflash.cli", "bench", "--preset", "tiny"]
    cmd += ["--modes", ",".join(modes), "--batch-sizes", "2,1", "--interleave"]
    cmd += ["--k", "7", "--tau", "0", "--prompt-len", "8", "--output-len", "12"]
    cmd += ["--enforce-eager", "--repeats", "3", "--dtype", "float32"]
    cmd += ["--out", str(out)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["interleave"] is True and data["meta"]["complete"] is True
    assert data["meta"]["modes"]["dynamic-k3"]["held_k"] == 3
    # Each engine's spec is kept beside its log.
    spec = json.loads((out / "dynamic-k3.spec.json").read_text())
    assert spec["draft_schedule"][0] == [1, 1 << 20, 3] and spec["k"] == 7
    assert spec["memory_share"] == pytest.approx(1 / 3)
    rows = {(r["mode"], r["batch"]): r for r in data["rows"]}
    assert sorted(rows) == sorted((m, b) for m in modes for b in (1, 2))
    for batch in (2, 1):
        mine = [rows[(m, batch)] for m in modes]
        assert all(r["tokens"] == 3 * 12 * batch for r in mine)
        # Pass i of the run, in time: the modes in turn, one later each pass.
        starts = sorted((t, r["mode"]) for r in mine for t in r["pass_start_s"])
        order = [mode for _, mode in starts]
        assert order == [m for i in range(3) for m in bench.pass_order(modes, i)]
    # Batch 2's rows were timed before batch 1's, in every engine.
    assert max(rows[(m, 2)]["pass_start_s"][-1] for m in modes) < min(
        rows[(m, 1)]["pass_start_s"][0] for m in modes
    )
    for batch in (2, 1):
        assert rows[("none", batch)]["drafts_per_request_step"] is None
        assert rows[("plugin-k3", batch)]["drafts_per_request_step"] == 3.0
        assert rows[("dynamic-k3", batch)]["drafts_per_request_step"] == 3.0
        assert rows[("dynamic-k3", batch)]["k"] == 7
    # Each pass's prompts are the same in every engine, and its output too
    # (greedy, real acceptance): the digests pair up pass by pass.
    for batch in (2, 1):
        digests = [rows[(m, batch)]["pass_output_digest"] for m in modes]
        assert len(set(digests[0])) == 3 and digests[1:] == [digests[0]] * 2
    # The passes pair up (bench.paired_ratio checks their start times).
    dynamic, plugin = (BenchRow(**rows[(m, 2)]) for m in ("dynamic-k3", "plugin-k3"))
    assert paired_ratio(dynamic, plugin) is not None


def test_rounds_restart_the_engines_in_the_other_order(tmp_path: Path) -> None:
    """``--rounds 2``: the run twice, every engine restarted and started one
    mode later (A B, then B A), each row holding both rounds' passes with
    the start position of the engine that ran it; the acceptance pools
    both rounds' counters."""
    out = tmp_path / "bench"
    modes = ["plugin-k3", "dynamic-k3"]
    cmd = [sys.executable, "-m", "vllm_dflash.cli", "bench", "--preset", "tiny"]
    cmd += ["--modes", ",".join(modes), "--batch-sizes", "1", "--interleave"]
    cmd += ["--k", "7", "--tau", "0", "--prompt-len", "8", "--output-len", "12"]
    cmd += ["--enforce-eager", "--repeats", "2", "--rounds", "2"]
    cmd += ["--dtype", "float32", "--out", str(out)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["rounds"] == 2 and data["meta"]["complete"] is True
    rows = {r["mode"]: r for r in data["rows"]}
    assert sorted(rows) == sorted(modes)
    assert rows["plugin-k3"]["pass_start_position"] == [0, 0, 1, 1]
    assert rows["dynamic-k3"]["pass_start_position"] == [1, 1, 0, 0]
    assert all(r["pass_round"] == [0, 0, 1, 1] for r in rows.values())
    # Round 2's engines have logs of their own, and ran after round 1's.
    for mode in modes:
        assert (out / f"{mode}.log").exists() and (out / f"{mode}-round2.log").exists()
    starts = [rows[m]["pass_start_s"] for m in modes]
    assert max(s[1] for s in starts) < min(s[2] for s in starts)
    for mode in modes:
        row = rows[mode]
        assert row["tokens"] == 4 * 12 and len(row["pass_tok_per_s"]) == 4
        assert len(row["pass_clock"]) == 4
        # A fresh engine draws the same prompts: round 2 generates round 1's
        # outputs (greedy, real acceptance).
        digests = row["pass_output_digest"]
        assert digests[2:] == digests[:2] and digests[0] != digests[1]
        drafts, accepted, draft_tokens = row["spec_counts"]
        assert draft_tokens == 3 * drafts and drafts > 0
        assert row["acceptance_length"] == pytest.approx(1 + accepted / drafts)
        assert row["drafts_per_request_step"] == 3.0
    pair = [BenchRow(**rows[m]) for m in modes]
    assert paired_ratio(*pair) is not None
