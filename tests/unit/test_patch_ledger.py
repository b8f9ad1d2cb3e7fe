"""Every runtime patch and version shim, tested against vLLM's own sources.

Each entry states a defect (or an interface difference) as a feature test on
the text of vLLM's files. For the oldest supported release the test must find
it: when it no longer does, the case fails and names the code to delete. For
vLLM 0.26 it must not (the fix is upstream there, and the patch stays out or
does nothing). Sources come from PyPI wheels (``tests/vllm_sources.py``),
whatever vLLM is installed here.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.vllm_sources import vllm_sources
from vllm_dflash import patching, support

OLDEST = "{}.{}.0".format(*support.OLDEST_SUPPORTED)
FIXED = "0.26.0"

SCHEDULER = "v1/core/sched/scheduler.py"
SELECTOR = "v1/attention/selector.py"
ATTENTION_CONFIG = "config/attention.py"
SPEC_CONFIG = "config/speculative.py"
BASE_PROPOSER = "v1/spec_decode/llm_base_proposer.py"
RUNNER = "v1/worker/gpu_model_runner.py"
FILES = [SCHEDULER, SELECTOR, ATTENTION_CONFIG, SPEC_CONFIG, BASE_PROPOSER, RUNNER]


def class_members(source: str, name: str) -> set[str]:
    """Annotated fields and methods of class ``name`` in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == name:
            members = set()
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(
                    item.target, ast.Name
                ):
                    members.add(item.target.id)
                elif isinstance(item, ast.FunctionDef):
                    members.add(item.name)
            return members
    raise LookupError(f"class {name} not found")


Sources = Callable[[str], str]


def _selector_forces(src: Sources) -> bool:
    forces = patching.selector_forces_non_causal(
        class_members(src(ATTENTION_CONFIG), "AttentionConfig")
    )
    if forces:  # the reason: non-causal follows the method, for every layer
        assert re.search(r"method\s*==\s*\"dflash\"", src(SELECTOR))
    return forces


@dataclass(frozen=True)
class Entry:
    name: str
    needed: Callable[[Sources], bool]
    delete: str
    """What to delete once the oldest supported vLLM no longer needs it."""


LEDGER = [
    Entry(
        "scheduler reserves K + 1 lookahead slots",
        lambda src: patching.scheduler_lacks_dflash_lookahead(src(SCHEDULER)),
        "the K + 1 part of patching.patch_scheduler_lookahead",
    ),
    Entry(
        "scheduler reserves lookahead in a request's first step",
        lambda src: patching.scheduler_skips_first_prefill_lookahead(src(SCHEDULER)),
        "the allocate_slots part of patching.patch_scheduler_lookahead",
    ),
    Entry(
        "only the drafter's attention is non-causal",
        _selector_forces,
        "patching.patch_attention_selector and patching.drafter_attention",
    ),
    Entry(
        "the drafter never inherits the target's attention backend",
        lambda src: (
            "attention_backend"
            not in class_members(src(SPEC_CONFIG), "SpeculativeConfig")
        ),
        "inherit_backend in proposer.with_draft_attention, "
        "support.route_draft_attention_backend, envs.DRAFT_ATTENTION_BACKEND",
    ),
    Entry(
        "greedy drafts without _sample_draft_tokens",
        lambda src: (
            "_sample_draft_tokens"
            not in class_members(src(BASE_PROPOSER), "SpecDecodeBaseProposer")
        ),
        "compat.sample_draft_tokens (call self._sample_draft_tokens)",
    ),
    Entry(
        "propose() called without num_speculative_tokens",
        lambda src: "num_speculative_tokens=" not in src(RUNNER),
        "the default of DFlashProposer.propose(num_speculative_tokens)",
    ),
    Entry(
        "multimodal targets refused by the base proposer",
        lambda src: (
            "_raise_if_multimodal"
            in class_members(src(BASE_PROPOSER), "SpecDecodeBaseProposer")
        ),
        "DFlashProposer._raise_if_multimodal",
    ),
    Entry(
        "runner reads target_layer_ids without the +1",
        lambda src: not re.search(r"i \+ 1 for i in \(?dflash_config", src(RUNNER)),
        "nothing (prepare_draft_config's explicit ids stay right); update the docs",
    ),
]


def _reader(version: str) -> Sources:
    root = vllm_sources(version, FILES)
    return lambda path: Path(root, "vllm", path).read_text()


@pytest.fixture(scope="module")
def oldest() -> Sources:
    return _reader(OLDEST)


@pytest.fixture(scope="module")
def fixed() -> Sources:
    return _reader(FIXED)


@pytest.mark.parametrize("entry", LEDGER, ids=lambda e: e.name)
def test_still_needed_on_oldest_supported(entry: Entry, oldest: Sources) -> None:
    assert entry.needed(oldest), (
        f"vLLM {OLDEST} (the oldest supported) no longer needs '{entry.name}': "
        f"delete {entry.delete}."
    )


@pytest.mark.parametrize("entry", LEDGER, ids=lambda e: e.name)
def test_not_needed_on_0_26(entry: Entry, fixed: Sources) -> None:
    assert not entry.needed(fixed)


def test_v1_runner_builds_proposer_from_module_global(
    oldest: Sources, fixed: Sources
) -> None:
    """patching.patch_v1_runner_proposer rebinds this name: needed on every
    supported release (vLLM has no proposer registry)."""
    for src in (oldest, fixed):
        runner = src(RUNNER)
        assert "from vllm.v1.spec_decode.dflash import DFlashProposer" in runner
        assert "DFlashProposer(self.vllm_config, self.device, self)" in runner


def test_v2_runner_of_0_26_does_not_pass_the_scheduled_k() -> None:
    """patching.patch_v2_draft_length exists because vLLM 0.26's V2 runner
    calls ``speculator.propose`` without the number of drafts the scheduler
    verifies next; vLLM 0.32's passes it (``num_speculative_tokens=``)."""
    path = "v1/worker/gpu/model_runner.py"
    runner = Path(vllm_sources(FIXED, [path]), "vllm", path).read_text()
    assert "self.speculator.propose(" in runner
    assert "num_spec_tokens_to_schedule" not in runner
    newer = Path(vllm_sources("0.32.0", [path]), "vllm", path).read_text()
    assert "num_speculative_tokens=num_spec_tokens" in newer


def _method(source: str, cls: str, name: str) -> str:
    """The source text of method ``name`` of class ``cls``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return ast.get_source_segment(source, item) or ""
    raise LookupError(f"{cls}.{name} not found")


def test_only_the_v2_runner_of_0_26_waits_for_the_gpu_once_a_step() -> None:
    """``patching.host_waits_once``: the adaptive policy splits a step into a
    host and a GPU part by the host's wait after the drafter's launch, which
    is the GPU's share only where nothing earlier in the step waits on it.
    vLLM 0.26's V2 runner launches a step without waiting (the engine core
    waits in ``AsyncOutput.get_output``); its V1 runner, under async
    scheduling with drafts, waits in ``execute_model`` for the previous
    step's accepted counts, which the DFlash branch of
    ``propose_draft_token_ids`` copies before launching the drafter."""
    v2_path, out_path = "v1/worker/gpu/model_runner.py", "v1/worker/gpu/async_utils.py"
    core_path, drafts_path = "v1/engine/core.py", "v1/worker/gpu/spec_decode/utils.py"
    root = vllm_sources(FIXED, [v2_path, out_path, RUNNER, core_path, drafts_path])
    v2 = Path(root, "vllm", v2_path).read_text()
    for name in ("execute_model", "sample_tokens"):
        body = _method(v2, "GPUModelRunner", name)
        assert "synchronize(" not in body and ".item()" not in body, name
    get_output = _method(
        Path(root, "vllm", out_path).read_text(), "AsyncOutput", "get_output"
    )
    assert "self.copy_event.synchronize()" in get_output
    # Except where a step has structured-output requests: the engine core
    # then samples it only after the previous step's output, and first
    # fetches that step's drafts, waiting for them (the policy's
    # ``blocked_earlier``, from ``pending_structured_output_tokens``).
    step = _method(
        Path(root, "vllm", core_path).read_text(), "EngineCore", "step_with_batch_queue"
    )
    deferred = step[step.index("if deferred_scheduler_output:") :]
    assert "pending_structured_output_tokens" in step
    assert deferred.index("take_draft_token_ids()") < deferred.index("sample_tokens(")
    fetch = _method(
        Path(root, "vllm", drafts_path).read_text(),
        "DraftTokensHandler",
        "get_draft_tokens",
    )
    assert "self.copy_event.synchronize()" in fetch

    v1 = Path(root, "vllm", RUNNER).read_text()
    execute = _method(v1, "GPUModelRunner", "execute_model")
    assert "deferred_state_corrections_fn()" in execute
    counts = _method(v1, "GPUModelRunner", "_get_valid_sampled_token_count")
    assert "sampled_count_event.synchronize()" in counts
    propose = _method(v1, "GPUModelRunner", "propose_draft_token_ids")
    dflash = propose[propose.index("spec_config.use_dflash()") :]
    assert dflash.index("_copy_valid_sampled_token_count(") < dflash.index(
        "self.drafter.propose("
    )
