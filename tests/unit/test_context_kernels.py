"""The context keys' norm and RoPE through vLLM's kernels compute what the
drafter's ``RMSNorm`` and ``get_rope`` modules compute, for every RoPE shape a
drafter can ask for; modules the kernels do not cover are refused, so the
drafter keeps their own forward."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from vllm_dflash import compat

pytestmark = pytest.mark.skipif(
    not compat.HAS_NORM_ROPE_KERNELS, reason="this vLLM build has no rms_norm/RoPE ops"
)

HEAD = 64
HEADS = 4
# The CUDA build registers these ops for CUDA tensors only (the H200 run).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def vllm_config() -> Iterator[None]:
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        yield


def rope(neox: bool = True, **params: Any) -> Any:
    params = {"rope_type": "default", "rope_theta": 10_000.0, **params}
    return compat.get_rope(
        HEAD,
        max_position=512,
        rope_parameters=params,
        is_neox_style=neox,
        dtype=torch.float32,
    ).to(DEVICE)


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(lambda: rope(), id="neox"),
        pytest.param(lambda: rope(neox=False), id="gpt-j"),
        pytest.param(lambda: rope(partial_rotary_factor=0.5), id="partial"),
        pytest.param(
            lambda: rope(
                rope_type="yarn", factor=4.0, original_max_position_embeddings=128
            ),
            id="yarn",
        ),
        pytest.param(
            lambda: rope(rope_type="proportional", partial_rotary_factor=0.25),
            id="gemma4-proportional",
        ),
    ],
)
def test_rope_kernel_equals_the_module(module: Any) -> None:
    r = module()
    found = compat.kernel_rope_of(r)
    assert found == (HEAD, r.is_neox_style)
    torch.manual_seed(0)
    positions = torch.randint(0, 512, (7,), device=DEVICE)
    keys = torch.randn(7, HEADS * HEAD, device=DEVICE)
    expected, _ = r.forward_native(positions, keys.clone(), None)
    assert not torch.allclose(expected, keys, atol=1e-3)  # it rotates something
    rotated = keys.clone()
    compat.rope_keys_kernel(positions, rotated, r.cos_sin_cache, *found)
    torch.testing.assert_close(rotated, expected, atol=1e-5, rtol=1e-5)


def test_rope_with_its_own_forward_is_refused() -> None:
    class OwnForward(type(rope())):  # type: ignore[misc]
        def forward_native(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("not called")

    r = rope()
    r.__class__ = OwnForward
    assert compat.kernel_rope_of(r) is None
    assert compat.kernel_rope_of(torch.nn.Identity()) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_equals_the_module(dtype: torch.dtype) -> None:
    norm = compat.RMSNorm(HEAD, eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, HEAD))
    found = compat.kernel_rms_norm_of(norm)
    assert found is not None and found[1] == 1e-6
    rows = torch.randn(9, HEADS * HEAD, dtype=dtype, device=DEVICE)
    x = rows[:, :HEAD]  # strided rows
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        compat.rms_norm_kernel(x, *found), norm.forward_native(x), atol=tol, rtol=tol
    )


def test_norms_the_kernel_does_not_cover_are_refused() -> None:
    assert compat.kernel_rms_norm_of(compat.RMSNorm(HEAD, has_weight=False)) is None
    partial = compat.RMSNorm(HEAD, var_hidden_size=HEAD // 2)
    assert compat.kernel_rms_norm_of(partial) is None

    class Shifted(compat.RMSNorm):  # e.g. Gemma's (1 + w) norm
        pass

    assert compat.kernel_rms_norm_of(Shifted(HEAD)) is None
