"""The toy language scales past the tiny target: ``toy_embed_scale`` gives a
wider, deeper random target greedy text that follows the successor cycles
(and too small a gain does not), and training can stop on a time limit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers

from vllm_dflash import tiny
from vllm_dflash.train import TrainConfig, train


def test_embed_scale_is_four_for_the_tiny_target_and_grows() -> None:
    def scale(hidden: int, layers: int) -> float:
        cfg = SimpleNamespace(hidden_size=hidden, num_hidden_layers=layers)
        return tiny.toy_embed_scale(cfg)

    assert scale(128, 4) == 4.0  # the tiny demo target keeps its weights
    assert scale(2048, 24) == 2 * scale(2048, 6) == 4 * scale(512, 6)


def follow_rate(path: Path, cycles: tuple[int, int]) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    vocab = model.config.vocab_size
    succ = tiny.successor_permutation(vocab, cycles, 0)
    ids = torch.randint(1, vocab, (4, 16), generator=torch.Generator().manual_seed(3))
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=0,
    )
    return (succ[out[:, 15:-1]] == out[:, 16:]).float().mean().item()


def test_wider_deeper_target_follows_its_successors(tmp_path: Path) -> None:
    shape = dict(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=2048,
    )
    cycles = (16, 24)
    default = tiny.build_target(
        tmp_path / "scaled", successor_cycles=cycles, dtype="bfloat16", **shape
    )
    weak = tiny.build_target(
        tmp_path / "weak", successor_cycles=cycles, embed_scale=1.0, **shape
    )
    assert json.loads((default / "config.json").read_text())["dtype"] == "bfloat16"
    assert follow_rate(default, cycles) == 1.0
    assert follow_rate(weak, cycles) < 0.5


def test_training_stops_at_the_time_limit(tmp_path: Path) -> None:
    target = tiny.build_target(tmp_path / "target", successor_cycles=tiny.TINY_CYCLES)
    cfg = TrainConfig(
        target=str(target),
        output=str(tmp_path / "drafter"),
        num_layers=2,
        block_size=8,
        target_layer_ids=[1, 2],
        intermediate_size=64,
        steps=1000,
        num_prompts=8,
        new_tokens=16,
        time_limit=0.0,
        progress=False,
    )
    result = train(cfg)
    assert result.steps == 1 and result.heldout_blocks > 0
    saved = json.loads((tmp_path / "drafter" / "dflash_training.json").read_text())
    assert saved["result"]["steps"] == 1


def test_gpu_train_summary_reads_rows_from_mode_logs(tmp_path: Path) -> None:
    """scripts/gpu_train_check.py: speedups over "none", and rows recovered
    from the bench's mode logs when a time limit stopped it before bench.json."""
    import importlib.util

    path = Path(__file__).parents[2] / "scripts" / "gpu_train_check.py"
    spec = importlib.util.spec_from_file_location("gpu_train_check", path)
    assert spec is not None and spec.loader is not None
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    (tmp_path / "none.log").write_text(
        "noise\n[bench]   none (v1) batch   8:     200.0 tok/s\n"
    )
    (tmp_path / "plugin.log").write_text(
        "[bench] plugin (v2) batch   8:     500.0 tok/s  tau 6.50\n"
    )
    rows = check.rows_from_logs(tmp_path)
    assert [(r["mode"], r["acceptance_length"]) for r in rows] == [
        ("none", None),
        ("plugin", 6.5),
    ]
    assert [r["speedup"] for r in check.speedups(rows)] == [1.0, 2.5]
