"""DFlash's math in plain PyTorch, written from the method's description
(not from the plugin's code), to check the plugin's drafter against."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    # x: [T, heads, hd]; neox layout (first half / second half)
    hd = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = positions.double()[:, None] * inv_freq[None, :]  # [T, hd/2]
    cos, sin = (
        angles.cos()[:, None, :].to(x.dtype),
        angles.sin()[:, None, :].to(x.dtype),
    )
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def draft_logits(
    drafter_dir: Path,
    target_dir: Path,
    target_features: torch.Tensor,  # [N, n*d] captured target layers
    next_token: int,
    num_drafts: int,
) -> torch.Tensor:
    """Logits [K, vocab] of block slots 1..K for a request whose whole context
    (positions 0..N-1) is ``target_features``."""
    cfg = json.loads((drafter_dir / "config.json").read_text())
    w = load_file(str(drafter_dir / "model.safetensors"))
    t = load_file(str(target_dir / "model.safetensors"))
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    heads, kv_heads, hd = (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
    )
    mask = cfg["dflash_config"]["mask_token_id"]
    n_ctx = target_features.shape[0]

    # Context feature: fc, then hidden_norm.
    ctx = rms_norm(target_features @ w["fc.weight"].T, w["hidden_norm.weight"], eps)
    ctx_pos = torch.arange(n_ctx)
    block_ids = torch.tensor([next_token] + [mask] * num_drafts)
    block_pos = torch.arange(n_ctx, n_ctx + num_drafts + 1)
    x = t["model.embed_tokens.weight"][block_ids]

    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)

        def heads_of(y: torch.Tensor, n: int) -> torch.Tensor:
            return y.view(y.shape[0], n, hd)

        q = heads_of(h @ w[p + "self_attn.q_proj.weight"].T, heads)
        q = rope(rms_norm(q, w[p + "self_attn.q_norm.weight"], eps), block_pos, theta)
        keys, values = [], []
        for src, pos in (
            (ctx, ctx_pos),
            (h, block_pos),
        ):  # context K/V use ctx directly
            k = heads_of(src @ w[p + "self_attn.k_proj.weight"].T, kv_heads)
            keys.append(
                rope(rms_norm(k, w[p + "self_attn.k_norm.weight"], eps), pos, theta)
            )
            values.append(heads_of(src @ w[p + "self_attn.v_proj.weight"].T, kv_heads))
        k_all = torch.cat(keys).repeat_interleave(heads // kv_heads, dim=1)
        v_all = torch.cat(values).repeat_interleave(heads // kv_heads, dim=1)
        # Non-causal: every block query sees all context and the whole block.
        scores = torch.einsum("qhd,khd->hqk", q, k_all) / hd**0.5
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v_all)
        x = x + attn.reshape(x.shape[0], -1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = (
            x
            + (gate * (h @ w[p + "mlp.up_proj.weight"].T))
            @ w[p + "mlp.down_proj.weight"].T
        )

    out = rms_norm(x, w["norm.weight"], eps)
    return out[1:] @ t["lm_head.weight"].T
