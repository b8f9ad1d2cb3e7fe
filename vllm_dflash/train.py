"""``vllm-dflash train``: train a DFlash drafter for a Hugging Face target.

The recipe (docs/training.md explains it):

1. Training text is the target's own greedy continuation of prompts (sampled
   token ids, or ``--data`` JSONL), so a block the drafter gets right is a
   block greedy verification accepts.
2. The target is frozen: its features (outputs of ``target_layer_ids``, HF
   ``hidden_states[i + 1]``), its embeddings and its lm_head are only read.
3. Each step picks random anchor positions in the generated part of each
   sequence. A block is ``[token at anchor, MASK x (B-1)]`` at positions
   ``anchor .. anchor+B-1``; it sees the target features of the positions
   *before* the anchor (what the plugin's proposer has cached at inference)
   and its own slots, non-causally.
4. Loss: cross-entropy on slots 1..B-1, slot k weighted ``exp(-(k-1)/gamma)``
   (early slots matter most: a miss there ends the accepted run).
5. The held-out figure is the expected acceptance length under greedy
   verification: ``1 + (leading correct drafts)`` averaged over held-out
   blocks, what vLLM reports as the mean acceptance length.

The output folder is a published-format drafter (``config.json`` with
``dflash_config`` + ``model.safetensors``) that this plugin and vLLM's native
DFlash load.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vllm_dflash.config import DFlashConfigError, DFlashDraftConfig
from vllm_dflash.torch_drafter import TorchDrafter, block_mask

RESULT_FILE = "dflash_training.json"
# Target features of the whole dataset are computed once when they fit here;
# otherwise every step runs the frozen target on its batch.
FEATURE_CACHE_BYTES = 2 << 30


@dataclass
class TrainConfig:
    """One training run: every option of ``vllm-dflash train``."""

    target: str
    output: str
    num_layers: int = 5
    """Draft decoder layers."""
    block_size: int = 16
    """B: the drafter proposes up to B-1 tokens per step."""
    target_layer_ids: list[int] | None = None
    """Target layers read (0-based, output of layer i); None: evenly spaced
    from 1 to L-3, one per draft layer, clamped for small targets."""
    mask_token_id: int | None = None
    """Id embedded at masked slots; None: the target's last vocabulary id."""
    intermediate_size: int | None = None
    """Draft MLP width; None: the target's."""
    steps: int = 2000
    lr: float = 6e-4
    warmup: float = 0.04
    """Fraction of steps with a linear learning-rate warm-up (then cosine)."""
    batch_size: int = 8
    """Sequences per step."""
    blocks_per_seq: int = 16
    """Anchors drawn from each sequence per step."""
    gamma: float | None = None
    """Decay of the slot weights; None: 7 for B=16, scaled by (B-1)/15."""
    data: str | None = None
    """JSONL of prompts; None: sampled token ids."""
    num_prompts: int = 512
    prompt_len: tuple[int, int] = (4, 64)
    """Length range of sampled prompts."""
    new_tokens: int = 256
    """Greedy tokens generated after each prompt (the training text)."""
    heldout: float = 0.1
    """Fraction of sequences kept out of training for the acceptance estimate."""
    eval_every: int = 100
    time_limit: float | None = None
    """Seconds of training after which the run stops early (then evaluates
    and saves); None: run all ``steps``."""
    device: str = "cpu"
    target_dtype: str = "auto"
    """Dtype the frozen target runs in; auto: float32 on CPU, bfloat16 else."""
    save_dtype: str = "bfloat16"
    tf32: bool = False
    """Let CUDA run the drafter's float32 matmuls in TF32 (several times
    faster on Ampere and later, a little less exact)."""
    seed: int = 0
    progress: bool = True
    extra_config: dict[str, Any] = field(default_factory=dict)
    """Extra fields for the drafter's config.json."""


@dataclass
class TrainResult:
    steps: int
    loss: float
    """Mean training loss over the last eval interval."""
    heldout_acceptance: float
    """Expected acceptance length tau (greedy, K = B-1) on held-out blocks."""
    heldout_first_token_accuracy: float
    initial_loss: float
    """Loss of the first step (the untrained drafter): about ln(vocab); far
    above it, the logits start saturated (see ``init_logit_scale``)."""
    train_sequences: int
    heldout_blocks: int
    elapsed_s: float
    target_layer_ids: list[int]


@dataclass
class Sequence:
    ids: list[int]
    prompt_len: int
    """Anchors lie at or after this index (the generated part)."""
    features: torch.Tensor | None = None
    """[len, n*d] target features, when precomputed."""


# -- options that depend on the target -------------------------------------------


def train_layer_ids(num_target_layers: int, count: int) -> list[int]:
    """``count`` target layers evenly spaced from 1 to L-3 (the published
    default), widened for small targets, never the last layer.

    The last layer is left out because HF's ``hidden_states[L]`` is after the
    final norm while vLLM captures that layer before it.
    """
    usable = num_target_layers - 1  # ids 0 .. L-2
    if count > usable:
        raise DFlashConfigError(
            "--num-layers",
            count,
            f"One target layer per draft layer by default, but the target has "
            f"{num_target_layers} layers of which {usable} can be read (not "
            "the last); use fewer draft layers or give --target-layer-ids.",
        )
    start, end = 1, num_target_layers - 3
    if end - start + 1 < count:  # small target: widen to L-2, then down to 0
        end = num_target_layers - 2
        start = min(1, end - count + 1)
    if count == 1:
        return [(start + end) // 2]
    step = (end - start) / (count - 1)
    return [round(start + i * step) for i in range(count)]


def default_gamma(block_size: int) -> float:
    """The method's gamma = 7 for B = 16, scaled to the block's length."""
    return 7.0 * (block_size - 1) / 15


def _rope_theta(target_cfg: dict[str, Any]) -> float:
    params = target_cfg.get("rope_parameters") or target_cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise DFlashConfigError(
            "target rope_type",
            kind,
            "The trainer implements default RoPE only; train for a target "
            "without RoPE scaling.",
        )
    theta = params.get("rope_theta", target_cfg.get("rope_theta"))
    return 10000.0 if theta is None else float(theta)


def drafter_hf_config(
    cfg: TrainConfig, target_cfg: dict[str, Any], layer_ids: list[int]
) -> dict[str, Any]:
    """The drafter's published-format ``config.json``."""
    heads = target_cfg["num_attention_heads"]
    hidden = target_cfg["hidden_size"]
    vocab = target_cfg["vocab_size"]
    mask = vocab - 1 if cfg.mask_token_id is None else cfg.mask_token_id
    return {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": cfg.intermediate_size or target_cfg["intermediate_size"],
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": target_cfg.get("num_key_value_heads") or heads,
        "head_dim": target_cfg.get("head_dim") or hidden // heads,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": target_cfg.get("rms_norm_eps", 1e-6),
        "vocab_size": vocab,
        "max_position_embeddings": target_cfg.get("max_position_embeddings", 32768),
        "rope_theta": _rope_theta(target_cfg),
        "tie_word_embeddings": False,
        "block_size": cfg.block_size,
        "num_target_layers": target_cfg["num_hidden_layers"],
        "torch_dtype": cfg.save_dtype,
        "dflash_config": {"mask_token_id": mask, "target_layer_ids": layer_ids},
        **cfg.extra_config,
    }


# -- the frozen target -------------------------------------------------------------


class Target:
    """The frozen HF target: greedy text, features, embeddings, lm_head."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype) -> None:
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype
        ).to(device)
        self.model.eval().requires_grad_(False)
        self.device = device
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = []
        self.eos: set[int] = {int(t) for t in (eos if isinstance(eos, list) else [eos])}

    @property
    def embed(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @torch.no_grad()
    def greedy(
        self, prompts: list[list[int]], new_tokens: int, batch_size: int = 256
    ) -> list[Sequence]:
        """Each prompt followed by the target's greedy continuation (up to and
        including a stop token)."""
        out: list[Sequence] = []
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        done: dict[int, Sequence] = {}
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            # Left padding, so every row's next token comes from the last column.
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            attn = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attn[row, width - len(prompts[i]) :] = 1
            gen = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=attn.to(self.device),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=sorted(self.eos) or None,
            )[:, width:].tolist()
            for row, i in enumerate(idx):
                cont = gen[row]
                stops = [j for j, t in enumerate(cont) if t in self.eos]
                cont = cont[: stops[0] + 1] if stops else cont
                done[i] = Sequence(prompts[i] + cont, len(prompts[i]))
        out = [done[i] for i in range(len(prompts))]
        return out

    @torch.no_grad()
    def features(
        self, ids: torch.Tensor, attention_mask: torch.Tensor, layer_ids: list[int]
    ) -> torch.Tensor:
        """[b, T] right-padded ids -> [b, T, n*d]: outputs of ``layer_ids``.

        Layer id i is the output of decoder layer i = ``hidden_states[i + 1]``.
        Right padding leaves every real position exact (causal attention).
        """
        out = self.model(
            input_ids=ids, attention_mask=attention_mask, output_hidden_states=True
        )
        return torch.cat([out.hidden_states[i + 1] for i in layer_ids], dim=-1)


# -- data --------------------------------------------------------------------------


def read_prompts(path: str, tokenizer_dir: str) -> list[list[int]]:
    """Prompts from JSONL: ``{"prompt_token_ids": [...]}``, ``{"prompt": "..."}``
    or ``{"messages": [...]}`` (chat template, generation prompt added)."""
    tokenizer = None
    prompts: list[list[int]] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt_token_ids" in row:
            prompts.append([int(t) for t in row["prompt_token_ids"]])
            continue
        if "prompt" not in row and "messages" not in row:
            raise DFlashConfigError(
                f"--data line {n}",
                sorted(row),
                'Each line needs "prompt_token_ids", "prompt" or "messages".',
            )
        if tokenizer is None:
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
        if "messages" in row:
            ids = tokenizer.apply_chat_template(
                row["messages"], add_generation_prompt=True, tokenize=True
            )
            prompts.append(list(getattr(ids, "input_ids", ids)))
        else:
            prompts.append(tokenizer(row["prompt"])["input_ids"])
    return prompts


def sample_prompts(
    n: int, vocab: int, mask_id: int, lengths: tuple[int, int], seed: int
) -> list[list[int]]:
    """Random token-id prompts (never the mask id)."""
    rng = random.Random(seed)
    lo, hi = lengths
    out = []
    for _ in range(n):
        ids = [rng.randrange(1, vocab - 1) for _ in range(rng.randint(lo, hi))]
        out.append([t + (t >= mask_id) for t in ids])
    return out


@dataclass
class Batch:
    ids: torch.Tensor  # [b, T] right-padded
    attention_mask: torch.Tensor  # [b, T]
    anchors: torch.Tensor  # [b, M]
    labels: torch.Tensor  # [b, M, B-1], -100 where past the sequence
    features: torch.Tensor | None  # [b, T, n*d] when precomputed


def make_batch(
    seqs: list[Sequence],
    anchors: list[list[int]],
    block_size: int,
    device: torch.device,
) -> Batch:
    width = max(len(s.ids) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full(
        (len(seqs), len(anchors[0]), block_size - 1), -100, dtype=torch.long
    )
    for row, (seq, rows) in enumerate(zip(seqs, anchors, strict=True)):
        ids[row, : len(seq.ids)] = torch.tensor(seq.ids)
        attn[row, : len(seq.ids)] = 1
        for m, a in enumerate(rows):
            target = seq.ids[a + 1 : a + block_size]
            labels[row, m, : len(target)] = torch.tensor(target)
    features = None
    if all(s.features is not None for s in seqs):
        features = torch.nn.utils.rnn.pad_sequence(
            [s.features for s in seqs],  # type: ignore[misc]
            batch_first=True,
        )
    return Batch(
        ids.to(device),
        attn.to(device),
        torch.tensor(anchors).to(device),
        labels.to(device),
        features,
    )


def precompute_features(
    target: Target, seqs: list[Sequence], layer_ids: list[int], batch_size: int = 32
) -> None:
    """Store each sequence's target features on it (small datasets only)."""
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        batch = make_batch(chunk, [[0]] * len(chunk), 2, target.device)
        feats = target.features(batch.ids, batch.attention_mask, layer_ids)
        for row, seq in enumerate(chunk):
            seq.features = feats[row, : len(seq.ids)].clone()


# -- one forward --------------------------------------------------------------------


def block_logits(
    drafter: TorchDrafter, target: Target, batch: Batch, layer_ids: list[int]
) -> torch.Tensor:
    """Draft logits [b, M, B-1, vocab] of every block's slots 1..B-1."""
    cfg = drafter.cfg
    q = cfg.block_size
    b, m = batch.anchors.shape
    features = batch.features
    if features is None:
        features = target.features(batch.ids, batch.attention_mask, layer_ids)
    n_ctx = features.shape[1]
    offsets = torch.arange(q, device=batch.ids.device)
    positions = (batch.anchors[:, :, None] + offsets).reshape(b, m * q)
    block_ids = torch.full_like(positions, cfg.mask_token_id)
    block_ids.view(b, m, q)[:, :, 0] = batch.ids.gather(1, batch.anchors)
    embeds = target.embed(block_ids).float()
    ctx_positions = torch.arange(n_ctx, device=positions.device).expand(b, -1)
    hidden = drafter(
        embeds,
        positions,
        features.float(),
        ctx_positions,
        block_mask(batch.anchors, n_ctx, q),
    )
    hidden = hidden.view(b, m, q, -1)[:, :, 1:]
    lm_head = target.lm_head
    return F.linear(hidden.to(lm_head.dtype), lm_head).float()


def weighted_loss(
    logits: torch.Tensor, labels: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Cross-entropy of slots 1..B-1, slot k weighted exp(-(k-1)/gamma)."""
    k = torch.arange(labels.shape[-1], device=labels.device, dtype=torch.float32)
    weights = torch.exp(-k / gamma).expand_as(labels) * (labels >= 0)
    ce = F.cross_entropy(
        logits.flatten(0, -2), labels.flatten().clamp(min=0), reduction="none"
    ).view_as(labels)
    return (ce * weights).sum() / weights.sum().clamp(min=1e-6)


def accepted_runs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Drafts greedy verification accepts per block: the run of leading
    drafts equal to the target's text. logits [..., B-1, V] -> [...]."""
    hits = (logits.argmax(-1) == labels).long()
    return hits.cumprod(-1).sum(-1)


def walk_acceptance(runs: list[list[int]]) -> float:
    """Mean acceptance length of speculative decoding over texts.

    ``runs[i][j]``: accepted drafts of the block anchored at the j-th
    generated token of text i. Decoding starts at the first generated token
    and each step advances by accepted + 1 (the bonus token), so the result
    is tokens / steps, as vLLM's mean acceptance length.
    """
    tokens = steps = 0
    for row in runs:
        j = 0
        while j < len(row):
            steps += 1
            tokens += row[j] + 1
            j += row[j] + 1
    return tokens / steps if steps else float("nan")


@dataclass
class Heldout:
    tau: float
    first_accuracy: float
    blocks: int


@torch.no_grad()
def evaluate(
    drafter: TorchDrafter,
    target: Target,
    seqs: list[Sequence],
    layer_ids: list[int],
    chunk: int = 64,
) -> Heldout:
    """Acceptance of ``drafter`` on held-out texts: every block with all its
    labels, then the decoding walk over them (``walk_acceptance``)."""
    q = drafter.cfg.block_size
    device = next(drafter.parameters()).device
    was_training = drafter.training
    drafter.eval()
    runs: list[list[int]] = []
    first = blocks = 0
    for seq in seqs:
        anchors = list(range(seq.prompt_len, len(seq.ids) - q + 1))
        row: list[int] = []
        for start in range(0, len(anchors), chunk):
            part = anchors[start : start + chunk]
            batch = make_batch([seq], [part], q, device)
            logits = block_logits(drafter, target, batch, layer_ids)
            hits = accepted_runs(logits, batch.labels)[0]
            row += hits.tolist()
            first += int((hits > 0).sum())
        runs.append(row)
        blocks += len(row)
    drafter.train(was_training)
    return Heldout(walk_acceptance(runs), first / max(1, blocks), blocks)


def lm_head_row_rms(lm_head: torch.Tensor) -> float:
    """Root mean square of the lm_head rows' norms: the spread of the logits
    of a unit-RMS hidden state (what the drafter's final norm gives at init)."""
    return float(lm_head.float().pow(2).sum(-1).mean().sqrt())


def init_logit_scale(drafter: TorchDrafter, lm_head: torch.Tensor) -> float:
    """Scale the drafter's final norm down so its first logits have unit
    spread, and return the factor (1 when the lm_head rows are short already).

    A target's lm_head with long rows (the toy-language targets' rows carry
    the embedding gain: about 34 for hidden 2048 and gain 37.6) turns the
    random first hidden states into logits tens of units apart: softmax is
    saturated, the loss starts in the hundreds and the drafter, stuck on
    wrong confident drafts, never learns the first slot.
    """
    factor = min(1.0, 1.0 / max(lm_head_row_rms(lm_head), 1e-6))
    with torch.no_grad():
        drafter.norm.weight.mul_(factor)
    return factor


# -- the loop --------------------------------------------------------------------


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, name)


def training_text(
    cfg: TrainConfig,
    target: Target,
    draft_cfg: DFlashDraftConfig,
    rng: random.Random,
) -> list[Sequence]:
    """Prompts and the target's greedy continuations, shuffled; with their
    target features when the whole set fits in ``FEATURE_CACHE_BYTES``."""
    prompts = (
        read_prompts(cfg.data, cfg.target)
        if cfg.data
        else sample_prompts(
            cfg.num_prompts,
            draft_cfg.vocab_size,
            draft_cfg.mask_token_id,
            cfg.prompt_len,
            cfg.seed,
        )
    )
    seqs = [
        s
        for s in target.greedy(prompts, cfg.new_tokens)
        if len(s.ids) - s.prompt_len >= cfg.block_size
    ]
    if len(seqs) < 2:
        raise DFlashConfigError(
            "--new-tokens",
            cfg.new_tokens,
            f"Only {len(seqs)} sequences continue for a whole block "
            f"({cfg.block_size} tokens); give more prompts or more new tokens.",
        )
    rng.shuffle(seqs)
    width = draft_cfg.fc_input_size * 4  # bytes per token in float32
    if sum(len(s.ids) for s in seqs) * width <= FEATURE_CACHE_BYTES:
        precompute_features(target, seqs, list(draft_cfg.target_layer_ids))
    return seqs


def train(cfg: TrainConfig) -> TrainResult:
    """Run the recipe and write the drafter to ``cfg.output``."""
    start_time = time.perf_counter()
    device = torch.device(cfg.device)
    if cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    target_cfg = json.loads((Path(cfg.target) / "config.json").read_text())
    target_cfg = target_cfg.get("text_config", target_cfg)
    num_target = int(target_cfg["num_hidden_layers"])
    layer_ids = list(
        cfg.target_layer_ids or train_layer_ids(num_target, cfg.num_layers)
    )
    hf_cfg = drafter_hf_config(cfg, target_cfg, layer_ids)
    draft_cfg = DFlashDraftConfig.from_hf_config(hf_cfg)
    draft_cfg.validate(
        target_hidden_size=int(target_cfg["hidden_size"]),
        target_vocab_size=int(target_cfg["vocab_size"]),
        target_num_layers=num_target,
        num_speculative_tokens=cfg.block_size - 1,
    )
    if max(layer_ids) >= num_target - 1:
        raise DFlashConfigError(
            "--target-layer-ids",
            layer_ids,
            f"Layer {num_target - 1} is the target's last: HF returns it after "
            "the final norm and vLLM captures it before, so a drafter trained on "
            f"it drafts from other features at inference. Use ids <= {num_target - 2}.",
        )
    gamma = cfg.gamma or default_gamma(cfg.block_size)

    target = Target(cfg.target, device, _resolve_dtype(cfg.target_dtype, device))
    seqs = training_text(cfg, target, draft_cfg, rng)
    n_held = max(1, round(len(seqs) * cfg.heldout))
    held, train_seqs = seqs[:n_held], seqs[n_held:]

    drafter = TorchDrafter(draft_cfg, float(hf_cfg["rope_theta"])).to(device)
    drafter.init_weights(torch.Generator().manual_seed(cfg.seed))
    init_logit_scale(drafter, target.lm_head)
    opt = torch.optim.AdamW(
        drafter.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0
    )
    warm = max(1, int(cfg.warmup * cfg.steps))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, cfg.steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, desc="train drafter", disable=not cfg.progress)
    held_out = Heldout(float("nan"), float("nan"), 0)
    recent: list[float] = []
    loop_start = time.perf_counter()
    done = 0
    initial_loss = float("nan")
    for step in range(cfg.steps):
        chosen = [
            train_seqs[rng.randrange(len(train_seqs))] for _ in range(cfg.batch_size)
        ]
        anchors = [
            [
                rng.randint(s.prompt_len, len(s.ids) - 2)
                for _ in range(cfg.blocks_per_seq)
            ]
            for s in chosen
        ]
        batch = make_batch(chosen, anchors, cfg.block_size, device)
        loss = weighted_loss(
            block_logits(drafter, target, batch, layer_ids), batch.labels, gamma
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = [*recent[-(cfg.eval_every - 1) :], loss.item()]
        if step == 0:
            initial_loss = recent[-1]
        done = step + 1
        out_of_time = (
            cfg.time_limit is not None
            and time.perf_counter() - loop_start > cfg.time_limit
        )
        if done % cfg.eval_every == 0 or done == cfg.steps or out_of_time:
            held_out = evaluate(drafter, target, held, layer_ids)
        bar.set_postfix(loss=f"{loss.item():.3f}", heldout_tau=f"{held_out.tau:.2f}")
        bar.update()
        if out_of_time:
            break
    bar.close()

    result = TrainResult(
        steps=done,
        loss=sum(recent) / len(recent),
        heldout_acceptance=held_out.tau,
        heldout_first_token_accuracy=held_out.first_accuracy,
        initial_loss=initial_loss,
        train_sequences=len(train_seqs),
        heldout_blocks=held_out.blocks,
        elapsed_s=time.perf_counter() - start_time,
        target_layer_ids=layer_ids,
    )
    save(drafter, hf_cfg, Path(cfg.output), cfg, result)
    return result


def save(
    drafter: TorchDrafter,
    hf_cfg: dict[str, Any],
    out: Path,
    cfg: TrainConfig,
    result: TrainResult,
) -> None:
    """config.json + model.safetensors (published names) + the recipe."""
    from safetensors.torch import save_file

    dtype = getattr(torch, cfg.save_dtype)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", dtype).contiguous()
        for k, v in drafter.state_dict().items()
    }
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    (out / RESULT_FILE).write_text(
        json.dumps({"recipe": asdict(cfg), "result": asdict(result)}, indent=2)
    )


# -- command line -------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(target="", output="")
    p.add_argument("--target", required=True, help="HF target folder (frozen)")
    p.add_argument("--output", required=True, help="folder for the drafter")
    p.add_argument("--num-layers", type=int, default=d.num_layers, help="draft layers")
    p.add_argument("--block-size", type=int, default=d.block_size, help="B (K = B-1)")
    p.add_argument(
        "--target-layer-ids",
        type=_ints,
        help="comma-separated target layers read (default: evenly spaced 1..L-3)",
    )
    p.add_argument("--mask-token-id", type=int, help="default: the last vocab id")
    p.add_argument("--intermediate-size", type=int, help="default: the target's")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences")
    p.add_argument("--blocks-per-seq", type=int, default=d.blocks_per_seq)
    p.add_argument("--gamma", type=float, help="slot-weight decay (default 7*(B-1)/15)")
    p.add_argument("--data", help="JSONL of prompts (default: sampled token ids)")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument(
        "--prompt-len",
        type=_ints,
        default=list(d.prompt_len),
        help="LO,HI length range of sampled prompts",
    )
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument(
        "--time-limit",
        type=float,
        help="stop after this many seconds of training, then evaluate and save",
    )
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1 ...")
    p.add_argument("--target-dtype", default=d.target_dtype)
    p.add_argument("--save-dtype", default=d.save_dtype)
    p.add_argument(
        "--tf32", action="store_true", help="TF32 matmuls on CUDA (faster training)"
    )
    p.add_argument("--seed", type=int, default=d.seed)


def train_command(args: argparse.Namespace) -> int:
    cfg = TrainConfig(
        target=args.target,
        output=args.output,
        num_layers=args.num_layers,
        block_size=args.block_size,
        target_layer_ids=args.target_layer_ids,
        mask_token_id=args.mask_token_id,
        intermediate_size=args.intermediate_size,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        blocks_per_seq=args.blocks_per_seq,
        gamma=args.gamma,
        data=args.data,
        num_prompts=args.num_prompts,
        prompt_len=(args.prompt_len[0], args.prompt_len[-1]),
        new_tokens=args.new_tokens,
        eval_every=args.eval_every,
        time_limit=args.time_limit,
        device=args.device,
        target_dtype=args.target_dtype,
        save_dtype=args.save_dtype,
        tf32=args.tf32,
        seed=args.seed,
    )
    result = train(cfg)
    print(
        f"drafter written to {cfg.output}: {result.steps} steps in "
        f"{result.elapsed_s:.0f}s, loss {result.initial_loss:.3f} -> "
        f"{result.loss:.3f}, held-out acceptance "
        f"length {result.heldout_acceptance:.2f} (K={cfg.block_size - 1}, "
        f"{result.heldout_blocks} blocks), target layers {result.target_layer_ids}"
    )
    return 0
