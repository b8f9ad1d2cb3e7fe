"""DFlash's math in plain PyTorch, written from the method's description
(not from the plugin's code), to check the plugin's drafter against.

The drafter's conventions (``Conventions``) are read here from the drafter's
and the target's ``config.json`` the way the method describes them, so a test
can also flip one of them and show that the plugin's logits then differ.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclasses.dataclass(frozen=True)
class Conventions:
    """How a drafter embeds, attends and produces logits."""

    embed_scale: float
    causal: tuple[bool, ...]  # per draft layer
    window: tuple[int | None, ...]  # per draft layer; None: full attention
    activation: str  # "silu" or "gelu_tanh"
    multiplier: float
    softcap: float | None

    @classmethod
    def of(cls, drafter_dir: Path, target_dir: Path) -> Conventions:
        cfg = json.loads((drafter_dir / "config.json").read_text())
        target = json.loads((target_dir / "config.json").read_text())
        dflash = cfg.get("dflash_config", {})

        def value(name: str, default: object = None) -> object:
            return dflash.get(name, cfg.get(name, default))

        gemma_target = str(target.get("model_type", "")).startswith("gemma")
        scale = value("input_embedding_scale")
        if scale is None:  # Gemma targets scale embeddings by sqrt(hidden)
            scale = math.sqrt(cfg["hidden_size"]) if gemma_target else 1.0
        n = cfg["num_hidden_layers"]
        types = cfg.get("layer_types") or ["full_attention"] * n
        sliding = [t == "sliding_attention" for t in types]
        window = dflash.get("swa_window_size", cfg.get("sliding_window"))
        causal = sliding  # sliding layers causal, full layers non-causal
        if dflash.get("causal") is not None:
            causal = [bool(dflash["causal"])] * n
        act = cfg.get("hidden_activation") or cfg.get("hidden_act", "silu")
        multiplier = float(value("output_multiplier", 1.0))  # type: ignore[arg-type]
        softcap = value("final_logit_softcapping")
        if softcap is None and multiplier == 1.0:
            # No conventions of its own: the target's logits processing.
            softcap = target.get("final_logit_softcapping")
        return cls(
            embed_scale=float(scale),  # type: ignore[arg-type]
            causal=tuple(causal),
            window=tuple(window if s else None for s in sliding),
            activation="silu" if act == "silu" else "gelu_tanh",
            multiplier=multiplier,
            softcap=None if not softcap else float(softcap),  # type: ignore[arg-type]
        )


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


def visible(
    q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool, window: int | None
) -> torch.Tensor:
    """[Q, K] mask: which keys each block query attends to."""
    mask = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
    delta = q_pos[:, None] - k_pos[None, :]
    if causal:
        mask &= delta >= 0
    if window is not None:
        mask &= delta < window
        mask &= -delta < window
    return mask


def draft_logits(
    drafter_dir: Path,
    target_dir: Path,
    target_features: torch.Tensor,  # [N, n*d] captured target layers
    next_token: int,
    num_drafts: int,
    conventions: Conventions | None = None,
) -> torch.Tensor:
    """Logits [K, vocab] of block slots 1..K for a request whose whole context
    (positions 0..N-1) is ``target_features``."""
    cfg = json.loads((drafter_dir / "config.json").read_text())
    conv = conventions or Conventions.of(drafter_dir, target_dir)
    w = load_file(str(drafter_dir / "model.safetensors"))
    t = load_file(str(target_dir / "model.safetensors"))
    embed = t["model.embed_tokens.weight"]
    lm_head = t.get("lm_head.weight", embed)  # tied embeddings (Gemma)
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
    # The target's raw embedding rows, times the drafter's scale.
    x = embed[block_ids] * conv.embed_scale
    act = (
        torch.nn.functional.silu
        if conv.activation == "silu"
        else lambda y: torch.nn.functional.gelu(y, approximate="tanh")
    )

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
        # Full layers: every block query sees all context and the whole block;
        # sliding layers: causal within their window.
        allowed = visible(
            block_pos, torch.cat([ctx_pos, block_pos]), conv.causal[i], conv.window[i]
        )
        scores = torch.einsum("qhd,khd->hqk", q, k_all) / hd**0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v_all)
        x = x + attn.reshape(x.shape[0], -1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = act(h @ w[p + "mlp.gate_proj.weight"].T)
        x = (
            x
            + (gate * (h @ w[p + "mlp.up_proj.weight"].T))
            @ w[p + "mlp.down_proj.weight"].T
        )

    out = rms_norm(x, w["norm.weight"], eps)
    logits = (out[1:] @ lm_head.T) * conv.multiplier
    if conv.softcap is not None:
        logits = torch.tanh(logits / conv.softcap) * conv.softcap
    return logits
