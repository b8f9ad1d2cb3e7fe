"""The V2-runner speculator's host-free block preparation (torch path on CPU;
on CUDA also the Triton kernel against it), against a plain per-request loop,
and the routing of ``init_speculator`` (the V2 runner itself only runs on
CUDA: scripts/gpu_checks.py covers it there)."""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch

from vllm_dflash import kernels, patching
from vllm_dflash.kernels import PAD_SLOT

MASK = 99
K = 3
Q = K + 1
KBS = 4  # kernel block size
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _inputs(
    device: str, max_model_len: int, num_reqs_padded: int
) -> kernels.BlockInputs:
    # Request 0 verified 4 tokens at positions 10..13 (2 rejected); request 1
    # is a chunked prefill whose chunk ended at position 5 (nothing sampled).
    def t(values: list[int], dtype: torch.dtype = torch.int32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    return kernels.BlockInputs(
        query_start_loc=t([0, 4, 5]),
        target_positions=t([10, 11, 12, 13, 5], torch.int64),
        num_rejected=t([2, 0]),
        num_sampled=t([2, 0]),
        idx_mapping=t([3, 1]),
        last_sampled=torch.arange(100, 108, device=device).view(8, 1),
        next_prefill_tokens=torch.arange(200, 208, dtype=torch.int32, device=device),
        block_tables=[
            t([[5, 6, 7, 8], [9, 10, 11, 12], [0, 0, 0, 0], [0, 0, 0, 0]]),
            t([[20, 21, 22, 23], [30, 31, 32, 33], [0, 0, 0, 0], [0, 0, 0, 0]]),
        ],
        kernel_block_sizes=[KBS, KBS],
        slot_mappings=[t([-7] * 64, torch.int64) for _ in range(2)],
        input_ids=t([-7] * 64),
        positions=t([-7] * 64, torch.int64),
        seq_lens=t([-7] * 8),
        block_query_start_loc=t([-7] * 9),
        num_reqs=2,
        num_reqs_padded=num_reqs_padded,
        block_len=Q,
        max_block_len=16,
        mask_token_id=MASK,
        max_model_len=max_model_len,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_block_inputs_match_a_per_request_loop(device: str) -> None:
    args = _inputs(device, max_model_len=15, num_reqs_padded=2)
    kernels.prepare_block(args)
    last = [11, 5]  # last accepted position per request
    bonus = [103, 201]  # last_sampled[state 3], next_prefill[state 1]
    for r in range(2):
        row = slice(r * Q, (r + 1) * Q)
        assert args.input_ids[row].tolist() == [bonus[r]] + [MASK] * K
        want_pos = [last[r] + 1 + j for j in range(Q)]
        assert args.positions[row].tolist() == [min(p, 14) for p in want_pos]
        assert args.seq_lens[r].item() == last[r] + 1 + Q
        for table, slots in zip(args.block_tables, args.slot_mappings, strict=True):
            blocks = table[r].tolist()
            want = [
                blocks[p // KBS] * KBS + p % KBS if p < 15 else PAD_SLOT
                for p in want_pos
            ]
            assert slots[row].tolist() == want
    assert args.block_query_start_loc[:3].tolist() == [0, Q, 2 * Q]


@pytest.mark.parametrize("device", DEVICES)
def test_padding_rows_attend_to_nothing(device: str) -> None:
    args = _inputs(device, max_model_len=64, num_reqs_padded=4)
    kernels.prepare_block(args)
    assert args.block_query_start_loc[:5].tolist() == [0, Q, 2 * Q, 2 * Q, 2 * Q]
    assert args.seq_lens[2:4].tolist() == [0, 0]
    for slots in args.slot_mappings:
        assert (slots[2 * Q : 4 * Q] == PAD_SLOT).all()
        assert (slots[4 * Q :] == -7).all()  # beyond the graph: untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton needs CUDA")
def test_triton_kernel_equals_the_torch_path() -> None:
    fused = _inputs("cuda", max_model_len=15, num_reqs_padded=4)
    plain = _inputs("cuda", max_model_len=15, num_reqs_padded=4)
    kernels.prepare_block_triton(fused)
    kernels.prepare_block_torch(plain)
    for name in ("input_ids", "positions", "seq_lens", "block_query_start_loc"):
        assert torch.equal(getattr(fused, name), getattr(plain, name)), name
    for a, b in zip(fused.slot_mappings, plain.slot_mappings, strict=True):
        assert torch.equal(a, b)


def _module(init: object) -> types.ModuleType:
    module = types.ModuleType("fake_spec_decode")
    module.init_speculator = init  # type: ignore[attr-defined]
    return module


def test_v2_init_speculator_routes_dflash_to_the_plugin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import vllm_dflash.speculator as speculator

    built: list[object] = []

    class Recorder:
        def __init__(self, vllm_config: object, device: object) -> None:
            built.append(vllm_config)

    monkeypatch.setattr(speculator, "DFlashSpeculator", Recorder)
    module = _module(lambda vllm_config, device: "native")
    patching.patch_v2_speculator(module)

    def config(method: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(
            speculative_config=types.SimpleNamespace(method=method)
        )

    assert module.init_speculator(config("eagle3"), "cuda") == "native"
    assert isinstance(module.init_speculator(config("dflash"), "cuda"), Recorder)
    assert len(built) == 1
    patching.patch_v2_speculator(module)  # idempotent
    assert module.init_speculator(config("eagle3"), "cuda") == "native"


def test_other_v2_interfaces_are_left_alone() -> None:
    def three_args(vllm_config: object, device: object, req_states: object) -> str:
        return "native"

    module = _module(three_args)
    patching.patch_v2_speculator(module)
    assert module.init_speculator is three_args


def _runner_module() -> tuple[types.ModuleType, list[tuple[object, dict]]]:
    calls: list[tuple[object, dict]] = []

    class GPUModelRunner:
        speculator: object = None

        def execute_model(self, scheduler_output: object, **kwargs: object) -> str:
            calls.append((scheduler_output, kwargs))
            return "output"

    module = types.ModuleType("fake_v2_runner")
    module.GPUModelRunner = GPUModelRunner  # type: ignore[attr-defined]
    return module, calls


def test_v2_runner_tells_the_speculator_how_many_drafts_are_verified() -> None:
    """vLLM 0.26's V2 runner does not pass the scheduled K to ``propose``; the
    patch hands each real step's value to the speculator before the step runs
    (dummy runs and speculators without ``set_draft_length`` are left alone)."""
    module, calls = _runner_module()
    patching.patch_v2_draft_length(module)
    patching.patch_v2_draft_length(module)  # idempotent: wrapped once
    told: list[int | None] = []
    runner = module.GPUModelRunner()
    runner.speculator = types.SimpleNamespace(set_draft_length=told.append)

    step = types.SimpleNamespace(num_spec_tokens_to_schedule=3)
    assert runner.execute_model(step) == "output"
    runner.execute_model(types.SimpleNamespace(num_spec_tokens_to_schedule=0))
    runner.execute_model(step, dummy_run=True)
    runner.execute_model(types.SimpleNamespace())  # no dynamic-K field
    assert told == [3, 0, None]
    assert len(calls) == 4 and calls[2][1] == {"dummy_run": True}

    runner.speculator = object()  # vLLM's own speculators
    assert runner.execute_model(step) == "output"
    assert told == [3, 0, None]


@pytest.mark.parametrize(
    ("asked", "dp_size", "drafts"),
    [(None, 1, 15), (7, 1, 7), (0, 1, 0), (40, 1, 15), (-1, 1, 0), (3, 2, 15)],
)
def test_draft_length_is_what_the_scheduler_verifies(
    asked: int | None, dp_size: int, drafts: int
) -> None:
    """K drafts per request next step, within 0..num_speculative_tokens; with
    data parallelism every rank keeps the longest block (one graph shape)."""
    from vllm_dflash.speculator import DFlashSpeculator

    spec = types.SimpleNamespace(num_speculative_steps=15, dp_size=dp_size)
    DFlashSpeculator.set_draft_length(spec, asked)  # type: ignore[arg-type]
    assert spec._num_drafts == drafts


def _speculator_at_k0(device: str) -> tuple[Any, list[int], Callable[[], None]]:
    """The plugin's V2 speculator without vLLM's runner (real buffers and
    block path; a drafter that records how many context tokens it stores),
    told to draft nothing next step (K 0), and one step's ``propose``."""
    from vllm_dflash.speculator import DFlashSpeculator

    args = _inputs(device, max_model_len=64, num_reqs_padded=2)
    stored: list[int] = []
    spec: Any = object.__new__(DFlashSpeculator)
    spec.__dict__.update(
        num_speculative_steps=15,
        _num_drafts=0,
        _block_kernel_built=False,
        _gids=[0, 1],
        _layer_rows=[0, 1],
        max_model_len=64,
        ctx_features=torch.zeros(64, 4, device=device),
        ctx_positions=torch.zeros(64, dtype=torch.int64, device=device),
        ctx_slots=torch.full((2, 64), PAD_SLOT, dtype=torch.int64, device=device),
        draft_tokens=torch.zeros(8, 15, dtype=torch.int64, device=device),
        stats=types.SimpleNamespace(context_tokens=0),
        draft_config=types.SimpleNamespace(mask_token_id=MASK),
        model=types.SimpleNamespace(
            store_context_kv=lambda features, *_: stored.append(len(features))
        ),
        block_tables=types.SimpleNamespace(
            input_block_tables=args.block_tables,
            kernel_block_sizes=args.kernel_block_sizes,
            slot_mappings=torch.stack(list(args.slot_mappings)),
        ),
        input_buffers=types.SimpleNamespace(
            input_ids=args.input_ids,
            positions=args.positions,
            seq_lens=args.seq_lens,
            query_start_loc=args.block_query_start_loc,
        ),
        _copy_request_inputs=lambda *_: None,  # vLLM's sampling buffers
    )
    batch = types.SimpleNamespace(
        num_reqs=2,
        num_tokens=5,
        query_start_loc=args.query_start_loc,
        positions=args.target_positions,
        idx_mapping=args.idx_mapping,
    )
    hidden = [torch.zeros(5, 2, device=device)] * 2  # two captured layers

    def step() -> None:
        spec.propose(
            batch,
            {},
            {},
            hidden[0],
            hidden,
            num_sampled=args.num_sampled,
            num_rejected=args.num_rejected,
            last_sampled=args.last_sampled,
            next_prefill_tokens=args.next_prefill_tokens,
            temperature=torch.zeros(0),
            seeds=torch.zeros(0),
        )

    return spec, stored, step


@pytest.mark.parametrize("device", DEVICES)
def test_a_k0_warm_up_step_builds_the_block_kernel_once(device: str) -> None:
    """vLLM's kernel warm-up schedules K 0, so the first K-0 propose also
    prepares a one-token block (building the Triton kernel before the first
    request); later K-0 steps only store the context K/V."""
    spec, stored, step = _speculator_at_k0(device)
    ids, seq_lens = spec.input_buffers.input_ids, spec.input_buffers.seq_lens
    step()
    assert stored == [5]  # the five target tokens' context K/V
    assert ids[:3].tolist() == [103, 201, -7]  # a one-token block per request
    assert seq_lens[:2].tolist() == [13, 7]  # last accepted 11 and 5, plus 2
    ids.fill_(-7)
    step()
    assert stored == [5, 5]
    assert (ids == -7).all()  # no block: nothing is drafted at K 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_tells_the_schedulers_clock_its_host_work_is_done(device: str) -> None:
    """Each propose ends by marking the scheduler's step clock in this
    process (``adaptive.drafted``), from which the clock times the host's
    wait for the GPU; a K-0 step, which only stores the context, too."""
    from vllm_dflash import adaptive

    _, _, step = _speculator_at_k0(device)
    saved = adaptive.last_clock
    try:
        clock = adaptive.install_clock()
        before = time.perf_counter()
        step()
        assert clock.drafted_s is not None
        assert before <= clock.drafted_s <= time.perf_counter()
    finally:
        adaptive.last_clock = saved
