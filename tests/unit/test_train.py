"""The trainer's drafter computes what the plugin computes at inference: one
block equals the independent plain-PyTorch reference (which the white-box e2e
test checks against the plugin), many blocks in one masked forward equal one
block at a time with the context cut at the anchor, and the checkpoint it
writes has exactly the published tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.reference import draft_logits
from vllm_dflash import tiny
from vllm_dflash.config import (
    DFlashConfigError,
    DFlashDraftConfig,
    checkpoint_tensor_shapes,
    default_target_layer_ids,
)
from vllm_dflash.torch_drafter import TorchDrafter, block_mask, load_drafter
from vllm_dflash.train import (
    Sequence,
    Target,
    TrainConfig,
    accepted_runs,
    drafter_hf_config,
    make_batch,
    read_prompts,
    train_layer_ids,
    walk_acceptance,
    weighted_loss,
)

DRAFT = tiny.TinyDrafter(num_hidden_layers=2, block_size=8, target_layer_ids=[0, 2])


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    target = tiny.build_target(root / "target")
    return target, tiny.build_drafter(root / "drafter", target, DRAFT, seed=4)


def target_weights(target: Path) -> tuple[torch.Tensor, torch.Tensor]:
    w = load_file(str(target / "model.safetensors"))
    return w["model.embed_tokens.weight"], w["lm_head.weight"]


def one_block(
    drafter: TorchDrafter,
    target: Path,
    features: torch.Tensor,  # [N, n*d]: the whole context
    next_token: int,
) -> torch.Tensor:
    """Logits [B-1, vocab] of one block after N context tokens."""
    embed, lm_head = target_weights(target)
    q, n = drafter.cfg.block_size, features.shape[0]
    ids = torch.tensor([[next_token] + [drafter.cfg.mask_token_id] * (q - 1)])
    hidden = drafter(
        embed[ids],
        torch.arange(n, n + q)[None],
        features[None],
        torch.arange(n)[None],
        block_mask(torch.tensor([[n]]), n, q),
    )
    return hidden[0, 1:] @ lm_head.T


def test_one_block_equals_the_reference(tiny_pair: tuple[Path, Path]) -> None:
    target, drafter_dir = tiny_pair
    drafter = load_drafter(str(drafter_dir))
    features = torch.randn(19, drafter.cfg.fc_input_size)
    with torch.no_grad():
        mine = one_block(drafter, target, features, next_token=42)
    expected = draft_logits(drafter_dir, target, features, 42, num_drafts=7)
    torch.testing.assert_close(mine, expected, atol=1e-4, rtol=1e-4)


def test_masked_blocks_equal_blocks_one_at_a_time(
    tiny_pair: tuple[Path, Path],
) -> None:
    """Training packs many blocks per sequence; each must see exactly the
    context before its anchor and its own block, as at inference."""
    target, drafter_dir = tiny_pair
    drafter = load_drafter(str(drafter_dir))
    embed, lm_head = target_weights(target)
    q, n = 8, 30
    features = torch.randn(2, n, drafter.cfg.fc_input_size)
    ids = torch.randint(0, 500, (2, n))
    anchors = torch.tensor([[3, 17, 29], [5, 6, 20]])
    block_ids = torch.full((2, 3, q), drafter.cfg.mask_token_id)
    block_ids[:, :, 0] = ids.gather(1, anchors)
    positions = (anchors[:, :, None] + torch.arange(q)).view(2, -1)
    with torch.no_grad():
        hidden = drafter(
            embed[block_ids.view(2, -1)],
            positions,
            features,
            torch.arange(n).expand(2, -1),
            block_mask(anchors, n, q),
        )
        packed = (hidden.view(2, 3, q, -1)[:, :, 1:] @ lm_head.T).view(2, 3, q - 1, -1)
        for b in range(2):
            for m in range(3):
                a = int(anchors[b, m])
                alone = one_block(drafter, target, features[b, :a], int(ids[b, a]))
                torch.testing.assert_close(packed[b, m], alone, atol=1e-4, rtol=1e-4)


def test_block_mask_hides_anchor_features_and_other_blocks() -> None:
    mask = block_mask(torch.tensor([[2, 4]]), num_context=5, block_size=3)[0]
    # Columns: context 0..4, then block 1's 3 slots, then block 2's.
    # A slot of block 1 (anchor 2) sees context 0, 1 and its own block.
    assert mask[0].tolist() == [1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    # A slot of block 2 (anchor 4) sees context 0..3 and its own block.
    assert mask[5].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    ("layers", "count", "expected"),
    [(36, 5, [1, 9, 17, 25, 33]), (4, 2, [1, 2]), (4, 3, [0, 1, 2]), (4, 1, [1])],
)
def test_train_layer_ids(layers: int, count: int, expected: list[int]) -> None:
    ids = train_layer_ids(layers, count)
    assert ids == expected
    assert max(ids) <= layers - 2  # never the last layer (HF: after final norm)
    if layers > 8:
        assert ids == default_target_layer_ids(layers, count)


def test_train_layer_ids_refuses_more_layers_than_usable() -> None:
    with pytest.raises(DFlashConfigError, match="3 can be read"):
        train_layer_ids(4, 4)


def test_written_config_is_the_published_format(
    tiny_pair: tuple[Path, Path],
) -> None:
    target, _ = tiny_pair
    target_cfg = json.loads((target / "config.json").read_text())
    cfg = TrainConfig(target=str(target), output="", num_layers=2, block_size=8)
    hf = drafter_hf_config(cfg, target_cfg, [1, 2])
    assert hf["architectures"] == ["DFlashDraftModel"]
    assert hf["dflash_config"] == {"mask_token_id": 511, "target_layer_ids": [1, 2]}
    assert hf["rope_theta"] == 10000.0  # read from transformers' rope_parameters
    draft = DFlashDraftConfig.from_hf_config(hf)
    names = set(TorchDrafter(draft, 1e4).state_dict())
    assert names == set(checkpoint_tensor_shapes(draft))


def test_loss_weights_and_acceptance() -> None:
    labels = torch.tensor([[1, 2, 3], [1, 2, -100]])
    logits = torch.full((2, 3, 4), -10.0)
    for row in range(2):
        for slot, token in enumerate([1, 2, 0]):
            logits[row, slot, token] = 10.0
    assert accepted_runs(logits, labels).tolist() == [2, 2]
    # All weight on slot 1 (gamma -> 0): the loss is slot 1's, which is right.
    assert weighted_loss(logits, labels, gamma=1e-6).item() < 1e-3
    assert weighted_loss(logits, labels, gamma=7.0).item() > 1.0
    # Decoding walk: anchor 0 accepts 2 (3 tokens), anchor 3 accepts 0, anchor
    # 4 accepts 1 (2 tokens): 6 tokens in 3 steps; blocks skipped over (1, 2,
    # 5) do not count, as in real decoding.
    assert walk_acceptance([[2, 7, 7, 0, 1, 7]]) == 2.0
    assert walk_acceptance([[0, 0], [3]]) == 6 / 3


def test_greedy_text_and_labels(tiny_pair: tuple[Path, Path]) -> None:
    """Batched (left-padded) greedy text equals one prompt at a time, and a
    block's labels are the tokens after its anchor."""
    target_dir, _ = tiny_pair
    target = Target(str(target_dir), torch.device("cpu"), torch.float32)
    prompts = tiny.prompts(3, min_len=2, max_len=9, seed=5)
    batched = target.greedy(prompts, new_tokens=12)
    for prompt, seq in zip(prompts, batched, strict=True):
        (alone,) = target.greedy([prompt], new_tokens=12)
        assert seq.ids == alone.ids and seq.prompt_len == len(prompt)
        with torch.no_grad():
            logits = target.model(torch.tensor([seq.ids])).logits[0]
        assert (
            logits[len(prompt) - 1 : -1].argmax(-1).tolist() == seq.ids[len(prompt) :]
        )
    seq = Sequence(list(range(10, 30)), prompt_len=4)
    batch = make_batch([seq], [[4, 15]], block_size=8, device=torch.device("cpu"))
    assert batch.labels[0, 0].tolist() == list(range(15, 22))
    assert batch.labels[0, 1].tolist() == [26, 27, 28, 29, -100, -100, -100]


def test_read_prompts(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt_token_ids": [5, 6, 7]}\n\n{"prompt_token_ids": [9]}\n')
    assert read_prompts(str(data), str(tmp_path)) == [[5, 6, 7], [9]]
    data.write_text('{"text": "hello"}\n')
    with pytest.raises(DFlashConfigError, match="line 1"):
        read_prompts(str(data), str(tmp_path))
