"""Hidden-state capture for targets whose vLLM class lacks the EAGLE-3
aux-hidden-state interface (Gemma 3, Mixtral, GLM-4-MoE, ...).

vLLM's runner gets the target's intermediate hidden states only from a model
that implements ``SupportsEagle3``: ``set_aux_hidden_state_layers(ids)``, after
which ``forward`` returns ``(hidden_states, [aux...])``. Model classes without
it fail with "Model does not support EAGLE3 interface".

For the architectures in :data:`CAPTURE_ARCHS` the plugin registers, under the
same architecture name, a subclass of vLLM's class that adds the interface:

- ``set_aux_hidden_state_layers`` *taps* the chosen decoder layers of the inner
  model (``model.layers``): their class is swapped for a subclass whose
  ``forward`` appends the residual stream after the layer to a list (parameter
  names, weights and attention prefixes are unchanged);
- the outer ``forward`` empties that list, runs the model, and returns
  ``(hidden_states, aux)``.

The states are *returned* from ``forward``, so compiled and graph-replayed
execution carries them: under torch.compile the appends are traced side
effects whose tensors become graph outputs; a full CUDA graph captures them as
outputs of the captured call.

Aux index ``j`` is the output of decoder layer ``j - 1`` (HF
``hidden_states[j]``), as in vLLM's own models; index 0 (the embeddings) is
not offered. How a layer's output gives the residual stream differs between
models, and a wrong choice fails silently, so each architecture names it:

``SUM``   layers return ``(delta, residual)`` and the next layer (or the final
          fused add-norm, ``norm(hidden_states, residual)``) adds them.
``FIRST`` layers return the stream itself (alone or first in a tuple); the
          model ends with ``norm(hidden_states)``.

The light part of this module (the table, :func:`register_overrides`) runs in
every vLLM process; classes are built lazily, in the process that loads them,
through the module attribute named by :func:`class_attr`.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

from vllm_dflash.config import DFlashConfigError

if TYPE_CHECKING:
    import torch

SUM = "hidden+residual"
FIRST = "hidden"

# Architecture -> how its decoder layers' outputs give the residual stream.
# Each entry was read in vLLM 0.26 and 0.32: the inner model runs
# ``for layer in islice(self.layers, self.start_layer, self.end_layer)`` and
# ends with the norm form named above (tests/unit/test_capture.py re-checks
# the installed vLLM). Gemma 3 and Mixtral are compared with transformers in
# tests/e2e/test_capture.py.
CAPTURE_ARCHS: dict[str, str] = {
    "CohereForCausalLM": SUM,
    "Cohere2ForCausalLM": SUM,
    "Ernie4_5_MoeForCausalLM": SUM,
    "Exaone4ForCausalLM": FIRST,
    "GemmaForCausalLM": SUM,
    "Gemma2ForCausalLM": SUM,
    "Gemma3ForCausalLM": SUM,
    "Glm4MoeForCausalLM": SUM,
    "Glm4MoeLiteForCausalLM": SUM,
    "GraniteMoeForCausalLM": FIRST,
    "InternLM2ForCausalLM": SUM,
    "MixtralForCausalLM": SUM,
    "NemotronForCausalLM": SUM,
    "OrionForCausalLM": FIRST,
    "PhiMoEForCausalLM": FIRST,
    "Qwen2MoeForCausalLM": SUM,
    "StableLmForCausalLM": FIRST,
    "Step3TextForCausalLM": SUM,
}

_TAG = "__vllm_"
# What each overridden architecture was registered as before the plugin.
_originals: dict[str, Any] = {}


class CaptureError(RuntimeError):
    """The target cannot return the hidden states DFlash needs."""


def class_attr(arch: str, vllm_version: str) -> str:
    """Name of this module's attribute that resolves to ``arch``'s class.

    vLLM caches a registered class's model info under "<module>-<class>" and
    invalidates it only when *this* file changes; the vLLM version in the name
    keeps an upgrade from reusing the info of the previous release's class.
    """
    return f"{arch}{_TAG}{re.sub(r'[^0-9A-Za-z]', '_', vllm_version)}"


def register_overrides(registry: Any, vllm_version: str) -> list[str]:
    """Point each :data:`CAPTURE_ARCHS` entry of ``registry`` (vLLM's
    ``ModelRegistry``) at this module; returns the architectures overridden.
    Idempotent; imports nothing heavy."""
    overridden = []
    for arch in CAPTURE_ARCHS:
        entry = registry.models.get(arch)
        if entry is None:
            continue  # this vLLM does not serve it
        if getattr(entry, "module_name", None) != __name__:
            _originals[arch] = entry
        registry.register_model(arch, f"{__name__}:{class_attr(arch, vllm_version)}")
        overridden.append(arch)
    return overridden


def __getattr__(name: str) -> type:
    # PEP 562: vLLM's lazy registry entry asks for class_attr(arch, version).
    arch, tag, _ = name.partition(_TAG)
    if not tag or arch not in _originals:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return capture_class(arch)


@functools.cache
def capture_class(arch: str) -> type:
    """vLLM's class for ``arch`` with the aux-hidden-state interface added
    (or vLLM's class itself if it already has the interface)."""
    from vllm_dflash import compat

    base = _originals[arch].load_model_cls()
    if compat.supports_eagle3(base):
        return base  # vLLM implements it natively now: step aside
    # The interface comes after ``base`` so that ``__init__`` is base's own:
    # vLLM reads its signature to decide how to construct the model.
    return type(
        base.__name__,
        (AuxHiddenStateCapture, base, compat.SupportsEagle3),
        {
            "__module__": __name__,
            "__qualname__": base.__qualname__,
            "capture_stream": CAPTURE_ARCHS[arch],
        },
    )


class AuxHiddenStateCapture:
    """Mixin: the EAGLE-3 aux-hidden-state interface for a decoder-only model
    whose inner model (``self.model``) loops over ``self.model.layers``."""

    capture_stream: str = SUM
    _capture_sink: list[torch.Tensor] | None = None
    _capture_count: int = 0

    def set_aux_hidden_state_layers(self, layers: tuple[int, ...]) -> None:
        decoder = _decoder_of(self)
        ids = sorted(set(int(i) for i in layers))
        num = len(decoder.layers)
        bad = [i for i in ids if not 1 <= i <= num]
        if bad:
            raise CaptureError(
                f"vllm-dflash capture: aux hidden-state indices {bad} are out of "
                f"range for {type(self).__name__} ({num} layers): index j is the "
                f"output of decoder layer j-1, so 1 <= j <= {num}."
            )
        for layer in decoder.layers:
            _untap(layer)
        if not ids:
            self._capture_sink, self._capture_count = None, 0
            return
        sink: list[torch.Tensor] = []
        for i in ids:
            _tap(decoder.layers[i - 1], sink, self.capture_stream)
        self._capture_sink, self._capture_count = sink, len(ids)

    def get_eagle3_default_aux_hidden_state_layers(self) -> tuple[int, ...]:
        num = len(_decoder_of(self).layers)
        return (2, num // 2, num - 3)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        sink = self._capture_sink
        if sink is None:
            return super().forward(  # type: ignore[misc]
                input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs
            )
        sink.clear()
        hidden = super().forward(  # type: ignore[misc]
            input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs
        )
        aux = list(sink)
        sink.clear()
        if len(aux) != self._capture_count:
            raise CaptureError(
                f"vllm-dflash capture: {type(self).__name__} ran {len(aux)} of the "
                f"{self._capture_count} tapped decoder layers in one forward; its "
                "layer loop does not fit the capture (see docs/capture.md)."
            )
        return hidden, aux


def _decoder_of(model: Any) -> Any:
    import torch

    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise CaptureError(
            f"vllm-dflash capture: {type(model).__name__} has no decoder-layer "
            "list at model.layers; start the target with --model-impl "
            "transformers instead."
        )
    return decoder


def _residual_stream(out: Any, stream: str) -> torch.Tensor:
    if not isinstance(out, tuple):
        return out
    if stream == SUM and out[1] is not None:
        return out[0] + out[1]
    return out[0]


@functools.cache
def _tapped_class(cls: Any) -> type:
    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = cls.forward(self, *args, **kwargs)
        self._capture_sink.append(_residual_stream(out, self._capture_stream))
        return out

    return type(
        cls.__name__,
        (cls,),
        {
            "forward": forward,
            "_capture_base": cls,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        },
    )


def _tap(layer: Any, sink: list[torch.Tensor], stream: str) -> None:
    cls: Any = type(layer)
    layer.__class__ = _tapped_class(cls)
    layer._capture_sink = sink
    layer._capture_stream = stream


def _untap(layer: Any) -> None:
    base = type(layer).__dict__.get("_capture_base")
    if base is not None:
        layer.__class__ = base
        del layer._capture_sink, layer._capture_stream


def is_tapped(layer: Any) -> bool:
    return "_capture_base" in type(layer).__dict__


def check_target(vllm_config: Any) -> None:
    """Fail at start-up, naming the architecture and the fix, if the target
    cannot return the hidden states DFlash reads."""
    from vllm_dflash import compat

    model_config = vllm_config.model_config
    model_cls, arch = compat.get_model_architecture(model_config)
    if not compat.supports_eagle3(model_cls):
        raise DFlashConfigError(
            "target architecture", arch, unsupported_fix(arch, model_config.model_impl)
        )
    pp = vllm_config.parallel_config.pipeline_parallel_size
    if issubclass(model_cls, AuxHiddenStateCapture) and pp > 1:
        raise DFlashConfigError(
            "pipeline_parallel_size",
            pp,
            f"The target {arch} gets its hidden states from vllm-dflash's "
            "capture, which runs without pipeline parallelism; use "
            "tensor parallelism instead.",
        )


def unsupported_fix(arch: str, model_impl: str) -> str:
    if model_impl == "transformers":
        how = "use a target whose vLLM class returns them"
    else:
        how = (
            "start the target with --model-impl transformers (vLLM's "
            "Transformers backend returns them for most decoder-only models; "
            "see vllm-dflash's docs/capture.md)"
        )
    return (
        f"DFlash reads hidden states of chosen target layers, but vLLM's class "
        f"for {arch} cannot return them (no EAGLE-3 aux-hidden-state "
        f"interface) and vllm-dflash's capture does not cover it. Fix: {how}; "
        f"or ask for {arch} in vllm_dflash.capture.CAPTURE_ARCHS."
    )
