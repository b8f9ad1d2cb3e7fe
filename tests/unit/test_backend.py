"""The drafter's attention backend is chosen apart from the target's and must
run non-causal attention."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_dflash import backend
from vllm_dflash.config import DFlashConfigError


def test_spec_config_backend_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_DFLASH_DRAFT_ATTENTION_BACKEND", "flex_attention")
    chosen = SimpleNamespace(name="CPU_ATTN")
    assert (
        backend.requested_backend(SimpleNamespace(attention_backend=chosen))
        == "CPU_ATTN"
    )
    assert backend.requested_backend(SimpleNamespace(attention_backend=None)) == (
        "FLEX_ATTENTION"
    )
    monkeypatch.delenv("VLLM_DFLASH_DRAFT_ATTENTION_BACKEND")
    assert backend.requested_backend(SimpleNamespace()) is None


def test_non_causal_backends_pass() -> None:
    backend.check_non_causal("CPU_ATTN")
    backend.check_non_causal("FLEX_ATTENTION")
    assert (
        backend.resolve(SimpleNamespace(attention_backend=None), needs_non_causal=True)
        is None
    )


@pytest.mark.parametrize("name", ["FLASHMLA", "ROCM_AITER_UNIFIED_ATTN"])
def test_causal_only_backend_is_refused(name: str) -> None:
    spec = SimpleNamespace(attention_backend=SimpleNamespace(name=name))
    with pytest.raises(DFlashConfigError) as info:
        backend.resolve(spec, needs_non_causal=True)
    assert info.value.field_name == "speculative_config.attention_backend"
    assert name in str(info.value) and "FLASH_ATTN" in str(info.value)
    # A causal-only drafter (every layer causal) may use it.
    assert backend.resolve(spec, needs_non_causal=False) == name


def test_unknown_backend_is_named() -> None:
    with pytest.raises(DFlashConfigError, match="Known backends"):
        backend.check_non_causal("NOT_A_BACKEND")


def test_flex_attention_target_refused_where_it_crashed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM 0.20 + a FLEX_ATTENTION target + DFlash crashed mid-request on an
    H200: refused at start-up there with the fix; allowed from vLLM 0.26
    (measured lossless). The drafter on FLEX ran losslessly on 0.20 and is not
    refused (only the target's backend is an argument)."""
    with pytest.raises(
        DFlashConfigError, match=r"attention_backend.*FLEX_ATTENTION.*TRITON_ATTN"
    ):
        backend.refuse_known_crashes("FLEX_ATTENTION", "0.20.0")
    with pytest.raises(DFlashConfigError, match=r"vLLM >= 0\.26"):
        backend.refuse_known_crashes("FLEX_ATTENTION", "0.25.1")
    backend.refuse_known_crashes("FLEX_ATTENTION", "0.26.0")
    backend.refuse_known_crashes("TRITON_ATTN", "0.20.0")
    backend.refuse_known_crashes(None, "0.20.0")
    # The escape hatch for re-testing on a new driver or build.
    monkeypatch.setenv("VLLM_DFLASH_ALLOW_KNOWN_CRASHES", "1")
    backend.refuse_known_crashes("FLEX_ATTENTION", "0.20.0")


def test_target_backend_is_named_from_the_engine_config() -> None:
    """What ``startup`` hands ``refuse_known_crashes``: vLLM keeps the target's
    ``--attention-backend`` as an enum member (or None)."""
    from types import SimpleNamespace

    def config(chosen: object) -> SimpleNamespace:
        return SimpleNamespace(attention_config=SimpleNamespace(backend=chosen))

    flex = backend.backend_enum("FLEX_ATTENTION")
    assert backend.target_backend(config(flex)) == "FLEX_ATTENTION"
    assert backend.target_backend(config("triton_attn")) == "TRITON_ATTN"
    assert backend.target_backend(config(None)) is None
    assert backend.target_backend(SimpleNamespace()) is None
    with pytest.raises(DFlashConfigError, match="attention_backend"):
        backend.refuse_known_crashes(backend.target_backend(config(flex)), "0.20.0")
