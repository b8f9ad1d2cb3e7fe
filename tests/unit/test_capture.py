"""The capture mixin on a small model shaped like vLLM's decoders (eager and
under torch.compile), its registration, and a re-check of the allow-list
against the installed vLLM's sources."""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.unit.test_registration import run_python
from vllm_dflash import capture
from vllm_dflash.capture import SUM, AuxHiddenStateCapture, CaptureError

D, VOCAB, LAYERS = 16, 32, 4


class ToyLayer(nn.Module):
    """Returns (delta, residual) like vLLM's fused add-norm decoder layers."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden if residual is None else hidden + residual
        return torch.tanh(self.proj(residual)), residual


class ToyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(ToyLayer() for _ in range(LAYERS))
        self.start_layer, self.end_layer = 0, LAYERS

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, *_: object
    ) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden, residual = layer(positions, hidden, residual)
        return hidden + residual


class ToyForCausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = ToyDecoder()

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, *rest: object
    ) -> torch.Tensor:
        return self.model(input_ids, positions, *rest)


CapturedToy = type(
    "ToyForCausalLM",
    (AuxHiddenStateCapture, ToyForCausalLM),
    {"capture_stream": SUM},
)


def streams(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Residual stream after each layer, computed by hand (HF hidden_states[1:])."""
    hidden, residual = model.model.embed_tokens(ids), None
    out = []
    for layer in model.model.layers:
        hidden, residual = ToyLayer.forward(layer, None, hidden, residual)
        out.append(hidden + residual)
    return out


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return CapturedToy().eval()


def test_forward_returns_output_of_layer_j_minus_1(model: nn.Module) -> None:
    ids, pos = torch.arange(7), torch.arange(7)
    plain = model(ids, pos)
    model.set_aux_hidden_state_layers((3, 1))
    hidden, aux = model(ids, pos)
    expected = streams(model, ids)
    torch.testing.assert_close(hidden, plain)
    assert len(aux) == 2  # layer order, whatever order they were asked in
    torch.testing.assert_close(aux[0], expected[0])
    torch.testing.assert_close(aux[1], expected[2])
    assert not torch.allclose(aux[1], expected[1])


def test_capture_survives_torch_compile(model: nn.Module) -> None:
    model.set_aux_hidden_state_layers((2, 4))
    # Compiled after the taps are set, as vLLM compiles the inner model on
    # its first forward; fullgraph: any graph break is an error.
    model.model.forward = torch.compile(
        model.model.forward, fullgraph=True, backend="aot_eager", dynamic=True
    )
    for n in (5, 9):  # the second call replays the compiled code
        ids = torch.randint(0, VOCAB, (n,))
        _, aux = model(ids, torch.arange(n))
        expected = streams(model, ids)
        torch.testing.assert_close(aux[0], expected[1])
        torch.testing.assert_close(aux[1], expected[3])
        assert model._capture_sink == []


def test_taps_keep_parameter_names_and_come_off(model: nn.Module) -> None:
    names = [n for n, _ in model.named_parameters()]
    model.set_aux_hidden_state_layers((1, 2))
    assert [n for n, _ in model.named_parameters()] == names
    assert [capture.is_tapped(layer) for layer in model.model.layers] == [
        True,
        True,
        False,
        False,
    ]
    model.set_aux_hidden_state_layers(())
    assert not any(capture.is_tapped(layer) for layer in model.model.layers)
    assert type(model.model.layers[0]) is ToyLayer
    assert isinstance(model(torch.arange(3), torch.arange(3)), torch.Tensor)


def test_default_layers_follow_vllm(model: nn.Module) -> None:
    assert model.get_eagle3_default_aux_hidden_state_layers() == (2, 2, 1)


@pytest.mark.parametrize("ids", [(0, 2), (5,)])
def test_out_of_range_index_is_refused(model: nn.Module, ids: tuple) -> None:
    with pytest.raises(CaptureError, match=r"1 <= j <= 4"):
        model.set_aux_hidden_state_layers(ids)


def test_layer_loop_that_skips_a_tap_is_an_error(model: nn.Module) -> None:
    model.set_aux_hidden_state_layers((1, 4))
    model.model.end_layer = 2  # the loop no longer reaches layer 3
    with pytest.raises(CaptureError, match="ran 1 of the 2 tapped"):
        model(torch.arange(3), torch.arange(3))


def test_residual_stream_rules() -> None:
    h, r = torch.ones(2), torch.full((2,), 2.0)
    assert capture._residual_stream((h, r), capture.SUM).tolist() == [3.0, 3.0]
    assert capture._residual_stream((h, r), capture.FIRST) is h
    assert capture._residual_stream((h, None), capture.SUM) is h
    assert capture._residual_stream(h, capture.FIRST) is h


PROBE = """
import inspect, json
from types import SimpleNamespace
import vllm_dflash
from vllm import ModelRegistry
vllm_dflash.register(); vllm_dflash.register()
from vllm.config import ModelConfig
from vllm_dflash import capture
entry = ModelRegistry.models["Gemma3ForCausalLM"]
out = dict(entry=f"{{entry.module_name}}:{{entry.class_name}}", check={{}})
for name, path, impl, pp in {cases!r}:
    config = SimpleNamespace(
        model_config=ModelConfig(model=path, model_impl=impl, skip_tokenizer_init=True),
        parallel_config=SimpleNamespace(pipeline_parallel_size=pp),
    )
    try:
        capture.check_target(config)
        out["check"][name] = "ok"
    except ValueError as e:
        out["check"][name] = str(e)
if entry.module_name == "vllm_dflash.capture":
    from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM as Base
    from vllm.model_executor.models.interfaces import supports_eagle3
    cls = entry.load_model_cls()
    capture._originals["NativeArch"] = ModelRegistry.models["LlamaForCausalLM"]
    capture.CAPTURE_ARCHS["NativeArch"] = capture.SUM
    out.update(
        subclass=issubclass(cls, Base) and cls is not Base,
        name=cls.__name__,
        eagle3=supports_eagle3(cls),
        base_eagle3=supports_eagle3(Base),
        init=sorted(inspect.signature(cls.__init__).parameters),
        original=capture._originals["Gemma3ForCausalLM"].module_name,
        native_steps_aside=capture.capture_class("NativeArch").__name__,
    )
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict]:
    """Registration and the start-up check in a fresh interpreter, as vLLM's
    worker sees them; tiny targets resolved by the real vLLM."""
    from vllm_dflash import tiny

    root = tmp_path_factory.mktemp("targets")
    gemma3, gpt2 = (
        str(tiny.build_target(root / f, family=f, num_hidden_layers=2))
        for f in ("gemma3", "gpt2")
    )
    cases = [
        ("gpt2", gpt2, "auto", 1),
        ("gpt2-transformers", gpt2, "transformers", 1),
        ("gemma3", gemma3, "auto", 1),
        ("gemma3-pp2", gemma3, "auto", 2),
    ]
    return functools.cache(
        lambda capture_on: run_python(
            PROBE.format(cases=cases if capture_on else cases[2:3]),
            VLLM_DFLASH_CAPTURE="1" if capture_on else "0",
        )
    )


def test_registration_overrides_allow_listed_architectures(probe: Callable) -> None:
    out = probe(True)
    assert out["entry"].startswith("vllm_dflash.capture:Gemma3ForCausalLM__vllm_")
    assert out["subclass"] and out["name"] == "Gemma3ForCausalLM"
    assert out["eagle3"] and not out["base_eagle3"]
    assert out["init"] == ["prefix", "self", "vllm_config"]
    assert out["original"] == "vllm.model_executor.models.gemma3"
    assert out["native_steps_aside"] == "LlamaForCausalLM"


def test_uncovered_target_fails_with_the_fix(probe: Callable) -> None:
    """Checked where the proposer is built, before the target's weights load."""
    check = probe(True)["check"]
    assert check["gpt2"].startswith(
        "vllm-dflash: invalid target architecture='GPT2LMHeadModel'."
    )
    assert "--model-impl transformers" in check["gpt2"]
    assert check["gpt2-transformers"] == "ok"
    assert check["gemma3"] == "ok"
    assert "invalid pipeline_parallel_size=2" in check["gemma3-pp2"]


def test_capture_can_be_switched_off(probe: Callable) -> None:
    out = probe(False)
    assert out["entry"] == "vllm.model_executor.models.gemma3:Gemma3ForCausalLM"
    assert "target architecture='Gemma3ForCausalLM'" in out["check"]["gemma3"]


LOOP = "islice(self.layers, self.start_layer, self.end_layer)"
NORM = {
    capture.SUM: r"hidden_states, _ = self\.norm\(hidden_states, residual\)",
    capture.FIRST: r"hidden_states = self\.norm\(hidden_states\)\n",
}


def test_allow_list_still_fits_installed_vllm() -> None:
    """Each entry's rule, re-read from the installed vLLM's source: a model
    that gains the interface, changes its loop or its final norm fails here
    (a wrong rule would silently feed the drafter the wrong states)."""
    from vllm.model_executor.models.registry import _TEXT_GENERATION_MODELS

    checked = 0
    for arch, stream in capture.CAPTURE_ARCHS.items():
        if arch not in _TEXT_GENERATION_MODELS:
            continue
        module, _ = _TEXT_GENERATION_MODELS[arch]
        name = module if "." in module else f"vllm.model_executor.models.{module}"
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        source = Path(spec.origin).read_text()
        assert "SupportsEagle3" not in source, (
            f"vLLM implements the interface for {arch} now: drop its entry"
        )
        assert LOOP in source, f"{arch}: layer loop changed; re-check the entry"
        assert re.search(NORM[stream], source), f"{arch}: final norm is not {stream}"
        assert not re.search(NORM[capture.FIRST if stream == SUM else SUM], source)
        checked += 1
    assert checked >= 15
