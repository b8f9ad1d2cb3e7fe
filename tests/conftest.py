"""Shared fixtures: tiny random models built once per session, no downloads."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tiny.TrainedPair:
    """A tiny target and a drafter trained for it (``tiny.TINY_RECIPE``,
    seeded): drafts are really accepted. Built once per session in a fresh
    cache folder (``trained.target.parent.parent``), or reused from
    ``$VLLM_DFLASH_CACHE_DIR`` when that is set."""
    explicit = os.environ.get("VLLM_DFLASH_CACHE_DIR")
    cache = Path(explicit) if explicit else tmp_path_factory.mktemp("dflash-cache")
    return tiny.trained_pair(cache, progress=False)
