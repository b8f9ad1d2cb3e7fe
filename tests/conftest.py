"""Shared fixtures: tiny random models built once per session, no downloads."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_dflash import tiny


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two target families and two drafter shapes per family."""
    root = tmp_path_factory.mktemp("models")
    out: dict[str, Path] = {}
    for family in ("qwen3", "llama"):
        target = tiny.build_target(root / f"{family}-target", family=family)
        out[f"{family}-target"] = target
        out[f"{family}-draft-a"] = tiny.build_drafter(
            root / f"{family}-draft-a",
            target,
            tiny.TinyDrafter(
                num_hidden_layers=2, block_size=8, target_layer_ids=[0, 2]
            ),
        )
        out[f"{family}-draft-b"] = tiny.build_drafter(
            root / f"{family}-draft-b",
            target,
            tiny.TinyDrafter(
                num_hidden_layers=3, block_size=16, target_layer_ids=[0, 1, 2]
            ),
            seed=2,
        )
    return out
