"""The DFlash drafter in plain PyTorch, for training (``train.py``).

Same math as the vLLM model in ``model.py``; ``tests/unit/test_train.py``
checks one block against the independent reference in
``tests/e2e/reference.py``, which the white-box e2e test checks against the
plugin inside a real engine. Module and parameter names are the published
checkpoint's, so ``state_dict()`` *is* the checkpoint (see
``config.checkpoint_tensor_shapes``).

One forward runs many blocks of many sequences at once (shapes for b
sequences of N context tokens, M blocks of Q slots each, n target layers):

    features [b, N, n*d] --fc--> --hidden_norm--> c [b, N, d]
    block ids [b, M*Q] --target embed--> x [b, M*Q, d]
    every layer: queries of x; keys/values of c (at the context positions)
                 followed by keys/values of x (at the block positions)
                 visible: mask [b, M*Q, N + M*Q] (block_mask builds it)
    --norm--> hidden [b, M*Q, d]; logits through the target's lm_head
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_dflash.config import DFlashConfigError, DFlashDraftConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as HF's Qwen3 and vLLM's kernels do."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding. x: [b, T, heads, hd]; positions: [b, T]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (
        torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd
    )
    angles = positions.float()[..., None] * inv_freq  # [b, T, hd/2]
    cos = angles.cos()[:, :, None, :].to(x.dtype)
    sin = angles.sin()[:, :, None, :].to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DFlashDraftConfig, rope_theta: float) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            hd,
        )
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(d, self.heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.rope_theta = rope_theta

    def _kv(
        self, src: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # src: [b, T, d] -> K (k_norm, RoPE at positions), V: [b, T, kv, hd]
        b, t, _ = src.shape
        k = self.k_norm(self.k_proj(src).view(b, t, self.kv_heads, self.head_dim))
        v = self.v_proj(src).view(b, t, self.kv_heads, self.head_dim)
        return rope(k, positions, self.rope_theta), v

    def forward(
        self,
        x: torch.Tensor,  # [b, Q, d] block tokens (already normed)
        positions: torch.Tensor,  # [b, Q]
        ctx: torch.Tensor,  # [b, N, d] fused target features
        ctx_positions: torch.Tensor,  # [b, N]
        mask: torch.Tensor,  # [b, Q, N + Q] bool, True = visible
    ) -> torch.Tensor:
        b, q_len, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, q_len, self.heads, self.head_dim))
        q = rope(q, positions, self.rope_theta)
        # Context K/V come from the fused features through this layer's own
        # k/v projections and k_norm, rotated at the context tokens' positions.
        k_ctx, v_ctx = self._kv(ctx, ctx_positions)
        k_blk, v_blk = self._kv(x, positions)
        k = torch.cat([k_ctx, k_blk], dim=1)
        v = torch.cat([v_ctx, v_blk], dim=1)
        rep = self.heads // self.kv_heads
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # [b, heads, Q, hd]
            k.transpose(1, 2).repeat_interleave(rep, dim=1),
            v.transpose(1, 2).repeat_interleave(rep, dim=1),
            attn_mask=mask[:, None],
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1))


class MLP(nn.Module):
    def __init__(self, cfg: DFlashDraftConfig) -> None:
        super().__init__()
        d, ffn = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        self.gelu = cfg.hidden_act != "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DFlashDraftConfig, rope_theta: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rope_theta)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        ctx: torch.Tensor,
        ctx_positions: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + self.self_attn(h, positions, ctx, ctx_positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TorchDrafter(nn.Module):
    """A trainable DFlash drafter; the target's embeddings and lm_head are
    passed in (frozen, never parameters of this module)."""

    def __init__(self, cfg: DFlashDraftConfig, rope_theta: float) -> None:
        super().__init__()
        if any(layer.causal or layer.sliding_window for layer in cfg.layers):
            raise DFlashConfigError(
                "layer_types",
                [layer.sliding_window for layer in cfg.layers],
                "The plain-PyTorch drafter trains full, non-causal layers only "
                "(the Qwen3-style DFlash recipe); drop layer_types/use_swa.",
            )
        self.cfg = cfg
        self.fc = nn.Linear(cfg.fc_input_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, rope_theta) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def init_weights(self, generator: torch.Generator, std: float = 0.02) -> None:
        """Normal(0, std) matrices, unit norms, zero biases (HF's init)."""
        for name, param in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    cpu = torch.empty(param.shape).normal_(0, std, generator=generator)
                    param.copy_(cpu)

    def forward(
        self,
        block_embeds: torch.Tensor,  # [b, Q, d] target embeddings of block ids
        positions: torch.Tensor,  # [b, Q]
        features: torch.Tensor,  # [b, N, n*d] captured target layers
        ctx_positions: torch.Tensor,  # [b, N]
        mask: torch.Tensor,  # [b, Q, N + Q]
    ) -> torch.Tensor:
        """Hidden states [b, Q, d] of every block slot (before the lm_head)."""
        ctx = self.hidden_norm(self.fc(features))
        x = block_embeds * self.cfg.embed_scale
        for layer in self.layers:
            x = layer(x, positions, ctx, ctx_positions, mask)
        return self.norm(x)


def block_mask(
    anchors: torch.Tensor, num_context: int, block_size: int
) -> torch.Tensor:
    """Which keys each block slot sees, for M blocks per sequence.

    anchors: [b, M] position of each block's first slot (its anchor token).
    Returns [b, M*Q, N + M*Q] (Q = block_size, N = num_context), True where
    visible: the context positions *before* the anchor, as the proposer
    attends at inference (the anchor is the token the target just emitted,
    whose features do not exist yet), and every slot of the block's own
    block (non-causal); never another block.
    """
    b, m = anchors.shape
    ctx_pos = torch.arange(num_context, device=anchors.device)
    ctx_ok = ctx_pos[None, None, :] < anchors[:, :, None]  # [b, M, N]
    ctx_ok = ctx_ok[:, :, None, :].expand(b, m, block_size, num_context)
    block_of = torch.arange(m * block_size, device=anchors.device) // block_size
    own = block_of[:, None] == block_of[None, :]  # [M*Q, M*Q]
    return torch.cat(
        [
            ctx_ok.reshape(b, m * block_size, num_context),
            own[None].expand(b, -1, -1),
        ],
        dim=-1,
    )


def load_drafter(path: str) -> TorchDrafter:
    """A published-format drafter folder as a ``TorchDrafter`` (float32)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    hf = json.loads((Path(path) / "config.json").read_text())
    params = hf.get("rope_parameters") or {}
    # Same default as the plugin (compat.rope_kwargs) when a config has none.
    theta = float(params.get("rope_theta", hf.get("rope_theta", 1_000_000.0)))
    drafter = TorchDrafter(DFlashDraftConfig.from_hf_config(hf), theta)
    weights = load_file(str(Path(path) / "model.safetensors"))
    drafter.load_state_dict({k: v.float() for k, v in weights.items()})
    return drafter
