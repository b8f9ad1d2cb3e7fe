"""Block preparation for the V2 speculator: one Triton kernel, one torch path.

Each step the draft block's inputs are derived on the device from the
verified target batch (no host synchronisation). For B requests padded to R
graph rows and block length Q:

    ids        [R*Q]  row r: [bonus_r, MASK x (Q-1)]
    positions  [R*Q]  p_r+1 .. p_r+Q (p_r: last accepted position), clamped
    seq_lens   [R]    p_r + 1 + Q (0 for padding rows)
    query_start_loc [R+1]  min(r, B) * Q
    slots      per KV-cache group [R*Q], PAD past the model length and for
               padding rows

The torch path issues ~20 small kernels; the Triton kernel does it in one
launch per KV-cache group, which is what the host side of a batch-1 step can
afford (docs/benchmarks/README.md has the measurement).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_dflash import compat
from vllm_dflash.compat import tl, triton

PAD_SLOT = compat.PADDING_SLOT_ID


@dataclass
class BlockInputs:
    """What the block is derived from, and the static buffers it is written to."""

    query_start_loc: torch.Tensor  # [B+1] target query starts (int32)
    target_positions: torch.Tensor  # [N] (int64)
    num_rejected: torch.Tensor  # [B]
    num_sampled: torch.Tensor  # [B]
    idx_mapping: torch.Tensor  # [B] batch row -> request state row
    last_sampled: torch.Tensor  # [max_reqs, n] last sampled token(s)
    next_prefill_tokens: torch.Tensor  # [max_reqs]
    block_tables: Sequence[torch.Tensor]  # per group [>=R, W] (int32)
    kernel_block_sizes: Sequence[int]
    slot_mappings: Sequence[torch.Tensor]  # per group [>=R*Q] (int64, out)
    input_ids: torch.Tensor  # [>=R*Q] (out)
    positions: torch.Tensor  # [>=R*Q] (out)
    seq_lens: torch.Tensor  # [>=R] (out)
    block_query_start_loc: torch.Tensor  # [>=R+1] (out)
    num_reqs: int
    num_reqs_padded: int
    block_len: int
    max_block_len: int  # the longest block any step runs (K_max + 1)
    mask_token_id: int
    max_model_len: int


def prepare_block(a: BlockInputs) -> None:
    """Fill the block's static input buffers (see the module docstring)."""
    if a.input_ids.is_cuda and compat.HAS_TRITON:
        prepare_block_triton(a)
    else:
        prepare_block_torch(a)


def prepare_block_torch(a: BlockInputs) -> None:
    b, r, q = a.num_reqs, a.num_reqs_padded, a.block_len
    device = a.input_ids.device
    # Index one past each request's last accepted target token.
    ends = a.query_start_loc[1 : b + 1].to(torch.int64)
    ends = ends - a.num_rejected[:b].to(torch.int64)
    last = a.target_positions[ends - 1].to(torch.int64)  # [B]
    pos = last[:, None] + 1 + torch.arange(q, device=device)  # [B, Q]
    state = a.idx_mapping[:b].to(torch.int64)
    # A request still in chunked prefill has sampled nothing: its block
    # starts from the next prompt token (its drafts are discarded).
    sampled = a.last_sampled.view(a.last_sampled.shape[0], -1)[state, -1]
    prefill = a.next_prefill_tokens[state].to(torch.int64)
    bonus = torch.where(a.num_sampled[:b] > 0, sampled, prefill)
    ids = a.input_ids[: b * q].view(b, q)
    ids.fill_(a.mask_token_id)
    ids[:, 0] = bonus.to(ids.dtype)
    a.positions[: b * q].copy_(pos.clamp(max=a.max_model_len - 1).view(-1))
    a.seq_lens[:b].copy_(last + 1 + q)
    a.seq_lens[b:r].fill_(0)
    starts = torch.arange(r + 1, device=device).clamp(max=b) * q
    a.block_query_start_loc[: r + 1].copy_(starts)
    in_range = pos < a.max_model_len
    for table, size, out in zip(
        a.block_tables, a.kernel_block_sizes, a.slot_mappings, strict=True
    ):
        index = (pos // size).clamp(max=table.shape[1] - 1)
        slots = table[:b].gather(1, index).to(torch.int64) * size + pos % size
        out[: b * q].copy_(torch.where(in_range, slots, PAD_SLOT).view(-1))
        out[b * q : r * q].fill_(PAD_SLOT)


def prepare_block_triton(a: BlockInputs) -> None:
    sampled = a.last_sampled.view(a.last_sampled.shape[0], -1)
    for group, (table, size, out) in enumerate(
        zip(a.block_tables, a.kernel_block_sizes, a.slot_mappings, strict=True)
    ):
        _block_inputs_kernel[(a.num_reqs_padded,)](
            a.query_start_loc,
            a.target_positions,
            a.num_rejected,
            a.num_sampled,
            a.idx_mapping,
            sampled,
            sampled.stride(0),
            sampled.shape[1],
            a.next_prefill_tokens,
            table,
            table.stride(0),
            table.shape[1],
            size,
            out,
            a.input_ids,
            a.positions,
            a.seq_lens,
            a.block_query_start_loc,
            a.num_reqs,
            a.num_reqs_padded,
            a.block_len,
            a.mask_token_id,
            a.max_model_len,
            PAD=PAD_SLOT,
            WRITE_TOKENS=group == 0,
            # From the longest block, not this step's: one compiled kernel
            # for every K.
            BLOCK=triton.next_power_of_2(a.max_block_len),
        )


# Triton compiles a new variant for an integer argument equal to 1 or
# divisible by 16. The batch and the block length change from step to step
# (adaptive K, requests finishing), and a value first met while serving
# would compile the kernel mid-request: those three are not specialised.
# The rest (buffers, strides, sizes) is fixed per engine, so both variants
# (WRITE_TOKENS true and false) are built at the speculator's first propose,
# in vLLM's warm-up (``DFlashSpeculator.propose``). ``vllm-dflash bench
# --engine-arg jit_monitor_verbose=true`` lists any later compile with its
# constants.
@triton.jit(do_not_specialize=["num_reqs", "num_reqs_padded", "block_len"])
def _block_inputs_kernel(
    qsl_ptr,
    target_pos_ptr,
    num_rejected_ptr,
    num_sampled_ptr,
    idx_mapping_ptr,
    last_sampled_ptr,
    last_sampled_stride,
    last_sampled_width,
    next_prefill_ptr,
    table_ptr,
    table_stride,
    table_width,
    kernel_block_size,
    slots_ptr,
    ids_ptr,
    pos_ptr,
    seq_lens_ptr,
    block_qsl_ptr,
    num_reqs,
    num_reqs_padded,
    block_len,
    mask_token_id,
    max_model_len,
    PAD: tl.constexpr,
    WRITE_TOKENS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per (padded) request row of the block.
    r = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    in_block = offs < block_len
    rows = r * block_len + offs
    if r < num_reqs:
        end = tl.load(qsl_ptr + r + 1).to(tl.int64)
        end = end - tl.load(num_rejected_ptr + r).to(tl.int64)
        last = tl.load(target_pos_ptr + end - 1).to(tl.int64)
        pos = last + 1 + offs
        if WRITE_TOKENS:
            state = tl.load(idx_mapping_ptr + r).to(tl.int64)
            bonus = tl.load(next_prefill_ptr + state).to(tl.int64)
            if tl.load(num_sampled_ptr + r) > 0:
                bonus = tl.load(
                    last_sampled_ptr
                    + state * last_sampled_stride
                    + last_sampled_width
                    - 1
                ).to(tl.int64)
            ids = tl.where(offs == 0, bonus, mask_token_id)
            tl.store(ids_ptr + rows, ids, mask=in_block)
            tl.store(pos_ptr + rows, tl.minimum(pos, max_model_len - 1), mask=in_block)
            tl.store(seq_lens_ptr + r, last + 1 + block_len)
            tl.store(block_qsl_ptr + r, r * block_len)
        index = tl.minimum(pos // kernel_block_size, table_width - 1)
        block = tl.load(table_ptr + r * table_stride + index, mask=in_block, other=0)
        slot = block.to(tl.int64) * kernel_block_size + pos % kernel_block_size
        slot = tl.where(pos < max_model_len, slot, PAD)
        tl.store(slots_ptr + rows, slot, mask=in_block)
    else:
        # Padding rows of a graph bigger than the batch attend to nothing.
        if WRITE_TOKENS:
            tl.store(seq_lens_ptr + r, 0)
            tl.store(block_qsl_ptr + r, num_reqs * block_len)
        tl.store(slots_ptr + rows, tl.full([BLOCK], PAD, tl.int64), mask=in_block)
    if WRITE_TOKENS:  # noqa: SIM102 - a constexpr test, then a runtime one
        if r == num_reqs_padded - 1:
            tl.store(block_qsl_ptr + num_reqs_padded, num_reqs * block_len)
