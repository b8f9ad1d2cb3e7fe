"""Helper of scripts/gpu_train.sh: build the toy-language target, then sum up.

    python3 scripts/gpu_train_check.py build WORK [--small] [--vocab N]
    python3 scripts/gpu_train_check.py summary WORK OUT

``build`` writes WORK/target (a Qwen3 target with the successor-cycle toy
language of ``vllm_dflash.tiny.build_target``, real bf16 weights) and
WORK/target_info.json (shape, parameter count, build time, and how often its
greedy text follows the successor). ``summary`` gathers the training result,
bench.json and the step timings into OUT/summary.json and prints them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

# About 1.2-1.3 B parameters in Qwen3-1.7B's width (hidden 2048, FFN 6144,
# 16 x 128 query heads, 8 KV heads) with 24 layers. The vocabulary decides
# whether a drafter learns the toy language in minutes: it has one successor
# per token to learn. Two H200 runs with 32768 ended at held-out tau 1.00 and
# 1.05; on a CPU stand-in (hidden 256, 6 layers) 32768 gave 1.00 and 4096 gave
# 4.27 (K 7, 900 steps), and 2.83 with the H200 recipe (5 layers, K 15) after
# 301 steps. ``--vocab`` picks it (``GPU_TRAIN_VOCAB`` in gpu_train.sh, 4096
# there).
LARGE: dict[str, Any] = dict(
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=32768,
    max_position_embeddings=4096,
    rope_theta=1000000.0,
)
# Cycles longer than the block (K = 15 drafts), so each draft's answer is
# already in the context after one lap.
CYCLES = (16, 24)


def build(work: Path, small: bool, vocab: int | None = None) -> dict[str, Any]:
    import torch
    import transformers

    from vllm_dflash import tiny

    device = "cuda" if torch.cuda.is_available() and not small else "cpu"
    shape = {} if small else LARGE
    if vocab is not None:
        shape = {**shape, "vocab_size": vocab}
    start = time.perf_counter()
    path = tiny.build_target(
        work / "target",
        family="qwen3",
        successor_cycles=CYCLES,
        device=device,
        dtype="bfloat16",
        **shape,
    )
    built = time.perf_counter() - start
    config = transformers.AutoConfig.from_pretrained(path)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(
        device
    )
    params = sum(p.numel() for p in model.parameters())
    # The toy language holds if the greedy next token is the successor.
    succ = tiny.successor_permutation(config.vocab_size, CYCLES, 0).to(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, config.vocab_size - 1, (8, 32), generator=gen).to(device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=32,
        do_sample=False,
        pad_token_id=0,
    )
    follows = (succ[out[:, 31:-1]] == out[:, 32:]).float().mean().item()
    info = {
        "device": device,
        "shape": {**tiny.TINY_TARGET, **shape},
        "cycles": list(CYCLES),
        "embed_scale": tiny.toy_embed_scale(config),
        "parameters": params,
        "build_s": round(built, 1),
        "greedy_follows_successor": round(follows, 4),
    }
    (work / "target_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return info


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each speculative bench row with its speedup over "none" at its batch."""
    base = {r["batch"]: r["tok_per_s"] for r in rows if r["mode"] == "none"}
    return [
        {
            "mode": r["mode"],
            "batch": r["batch"],
            "tok_per_s": round(r["tok_per_s"], 1),
            "tau": r["acceptance_length"],
            "speedup": (
                round(r["tok_per_s"] / base[r["batch"]], 2)
                if r["batch"] in base
                else None
            ),
        }
        for r in rows
    ]


def rows_from_logs(folder: Path) -> list[dict[str, Any]]:
    """Bench rows from the per-mode logs' progress lines, for a bench stopped
    before it wrote bench.json (``[bench]   mode (v1) batch 8: 123.4 tok/s
    tau 5.67``)."""
    import re

    line = re.compile(
        r"\[bench\]\s+(\w+) \((\w+)\) batch\s+(\d+):\s+([\d.]+) tok/s"
        r"(?:\s+tau ([\d.]+))?"
    )
    rows = []
    for log in sorted(folder.glob("*.log")):
        for m in line.finditer(log.read_text(errors="replace")):
            rows.append(
                {
                    "mode": m[1],
                    "runner": m[2],
                    "batch": int(m[3]),
                    "tok_per_s": float(m[4]),
                    "acceptance_length": float(m[5]) if m[5] else None,
                }
            )
    return rows


def summary(work: Path, out: Path) -> int:
    def load(path: Path) -> Any:
        return json.loads(path.read_text()) if path.exists() else None

    training = load(work / "drafter" / "dflash_training.json")
    bench = load(work / "bench" / "bench.json")
    timings: dict[str, Any] = {}
    if (work / "timings.txt").exists():
        for line in (work / "timings.txt").read_text().splitlines():
            step, rc, seconds = line.split()
            timings[step] = {"rc": int(rc), "seconds": int(seconds)}
    result = {
        "target": load(work / "target_info.json"),
        "training": training and training["result"],
        "recipe": training and training["recipe"],
        "bench": speedups(bench["rows"] if bench else rows_from_logs(work / "bench")),
        "bench_meta": bench and bench["meta"],
        "timings": timings,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    target, train = result["target"] or {}, result["training"] or {}
    print("== gpu_train summary ==")
    print(
        f"target: {target.get('parameters', 0) / 1e6:.1f} M parameters, greedy "
        f"follows successor {target.get('greedy_follows_successor')}, built in "
        f"{target.get('build_s')} s on {target.get('device')}"
    )
    print(
        f"drafter: {train.get('steps')} steps in {train.get('elapsed_s', 0):.0f} s, "
        f"loss {train.get('initial_loss', float('nan')):.3f} at the first step, "
        f"{train.get('loss', float('nan')):.3f} at the end, held-out tau "
        f"{train.get('heldout_acceptance', float('nan')):.2f}"
    )
    if not bench:
        print("bench.json missing: rows below are from the mode logs")
    for row in result["bench"]:
        print(
            f"bench {row['mode']:>6} batch {row['batch']:>2}: {row['tok_per_s']:>9} "
            f"tok/s  tau {row['tau'] or '-'}  speedup {row['speedup']}"
        )
    print("timings:", json.dumps(timings))
    return 0 if all(t["rc"] == 0 for t in timings.values()) and bench else 1


if __name__ == "__main__":
    if sys.argv[1] == "build":
        vocab = None
        if "--vocab" in sys.argv:
            vocab = int(sys.argv[sys.argv.index("--vocab") + 1])
        build(Path(sys.argv[2]), "--small" in sys.argv, vocab)
    elif sys.argv[1] == "summary":
        sys.exit(summary(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        raise SystemExit(__doc__)
