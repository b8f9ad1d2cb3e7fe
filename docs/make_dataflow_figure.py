"""Draw docs/dataflow.png: one DFlash decoding step as data flows through it.

python docs/make_dataflow_figure.py          # needs matplotlib
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = Path(__file__).resolve().parent / "dataflow.png"

TARGET = "#dbe9f6"  # vLLM's target model and sampler
PLUGIN = "#fde7c8"  # vllm-dflash
CACHE = "#e3f1dc"  # the paged KV cache
EDGE = "#44546a"


def box(ax, x, y, w, h, title, body, color, where=""):
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0.02,rounding_size=0.12",
            fc=color,
            ec=EDGE,
            lw=1.2,
        )
    )
    ax.text(x + 0.15, y + h - 0.2, title, fontsize=10.5, weight="bold", va="top")
    ax.text(x + 0.15, y + h - 0.58, body, fontsize=8.6, va="top", linespacing=1.35)
    if where:
        ax.text(
            x + w - 0.12,
            y + 0.1,
            where,
            fontsize=7.8,
            ha="right",
            va="bottom",
            color="#555555",
            family="monospace",
        )


def arrow(ax, a, b, label="", rad=0.0, color=EDGE, offset=(0.0, 0.12)):
    ax.add_patch(
        FancyArrowPatch(
            a,
            b,
            arrowstyle="-|>",
            mutation_scale=14,
            lw=1.4,
            color=color,
            connectionstyle=f"arc3,rad={rad}",
        )
    )
    if label:
        mx, my = (a[0] + b[0]) / 2 + offset[0], (a[1] + b[1]) / 2 + offset[1]
        ax.text(mx, my, label, fontsize=8, ha="center", va="bottom", color="#333333")


def main(out: Path = OUT) -> None:
    fig, ax = plt.subplots(figsize=(15, 9.2))
    ax.set_xlim(0, 15)
    ax.set_ylim(0, 9.2)
    ax.axis("off")
    ax.text(
        0.2,
        8.85,
        "One DFlash step in vLLM with vllm-dflash  (K drafts per request, "
        "block Q = K+1, n captured target layers of width d)",
        fontsize=12.5,
        weight="bold",
    )

    # Row A: target forward, capture, fusion + context K/V (steps 1, 2, 4).
    box(
        ax, 0.3, 6.1, 3.9, 1.95,
        "1  Target forward",
        "bonus token + K drafts per request\n= N scheduled tokens, one pass\n"
        "of the target model",
        TARGET, "vLLM model runner",
    )  # fmt: skip
    box(
        ax, 4.7, 6.1, 4.2, 1.95,
        "2  Capture",
        "outputs of target layers i in\ntarget_layer_ids = aux index i+1;\n"
        "concat -> features [N, n*d]",
        TARGET, "aux hidden states (EAGLE-3 API)",
    )  # fmt: skip
    box(
        ax, 9.4, 6.1, 5.3, 1.95,
        "4  Fusion + context K/V",
        "fc [n*d -> d] -> hidden_norm -> c; per draft layer l:\n"
        "K = RoPE(k_norm(W_k c), own positions), V = W_v c\n"
        "-> draft KV cache at the N tokens' slots",
        PLUGIN, "model.store_context_kv",
    )  # fmt: skip

    # Row B: verify and the draft block (steps 3, 5).
    box(
        ax, 0.3, 2.95, 3.9, 2.3,
        "3  Verify",
        "rejection sampler over the\ndrafts: longest matching prefix\n"
        "+ 1 bonus token per request\n(tau = 1 .. K+1 tokens/step)",
        TARGET, "vLLM sampler",
    )  # fmt: skip
    box(
        ax, 9.4, 2.95, 5.3, 2.3,
        "5  Draft block (one forward)",
        "ids [bonus, MASK x K] at positions p+1 .. p+Q\n"
        "(p = last accepted position); target embed_tokens\n"
        "x embed scale -> draft layers; queries see context\n"
        "<= p + the whole block (non-causal on full layers)\n"
        "-> target lm_head on slots 1..K -> argmax: K drafts",
        PLUGIN, "proposer.py (V1) / speculator.py (V2)",
    )  # fmt: skip

    # Row C: KV bookkeeping and where it runs.
    box(
        ax, 4.7, 0.3, 10.0, 2.0,
        "6  KV bookkeeping (draft layers' paged KV cache, per KV cache group)",
        "context K/V persist across steps at their tokens' slots; the block's "
        "own K/V land at p+1 .. p+Q and are\noverwritten next step by the "
        "context K/V of the tokens verified there; seq_lens are trimmed by the\n"
        "rejected count, so rejected positions are never attended.",
        CACHE, "block tables of the target's batch",
    )  # fmt: skip
    box(
        ax, 0.3, 0.3, 3.9, 2.2,
        "Runners",
        "V1: DFlashProposer; the block forward\n  eager or in vLLM's CUDA graphs\n"
        "V2 (vLLM 0.26): DFlashSpeculator;\n  4 + 5 in one FULL CUDA graph,\n"
        "  block inputs: kernels.prepare_block",
        "#f2f2f2",
    )  # fmt: skip

    # V2 graph boundary around steps 4 and 5.
    ax.add_patch(
        FancyBboxPatch(
            (9.25, 2.8),
            5.6,
            5.4,
            boxstyle="round,pad=0.02,rounding_size=0.15",
            fc="none",
            ec="#c0504d",
            lw=1.3,
            ls="--",
        )
    )
    ax.text(
        14.85, 8.25, "V2: one FULL CUDA graph per batch size",
        fontsize=8.5, ha="right", va="bottom", color="#c0504d",
    )  # fmt: skip

    arrow(ax, (4.2, 7.05), (4.7, 7.05))
    arrow(ax, (8.9, 7.05), (9.4, 7.05))
    arrow(ax, (2.25, 6.1), (2.25, 5.25), "logits of the N tokens", offset=(1.05, -0.1))
    arrow(ax, (12.05, 6.1), (12.05, 5.25), "context in cache",
          offset=(0.85, -0.1))  # fmt: skip
    arrow(ax, (4.2, 4.75), (9.4, 4.75), "bonus token, accepted length p")
    arrow(ax, (9.4, 3.55), (4.2, 3.55), "K drafts: verified in the next step",
          offset=(0.0, -0.42))  # fmt: skip
    arrow(ax, (12.05, 2.95), (12.05, 2.3), "block K/V", offset=(0.55, -0.1))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
