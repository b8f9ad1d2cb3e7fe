"""Pieces of the serving tests that need no server: the ``/metrics`` reader,
the tiny tokenizer and the hand-built echo drafter."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from vllm_dflash import serve, tiny

METRICS = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 10.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="m"} 6.0
vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 1.79e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 48.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 20.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 12.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 2.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 6.0
vllm:spec_decode_num_accepted_tokens_per_pos_created{engine="0",model_name="m",position="0"} 1.79e+09
vllm:num_requests_running{engine="0",model_name="m"} 0.0
"""  # noqa: E501


def test_metrics_reader_sums_engines_and_orders_positions() -> None:
    m = serve.parse_spec_metrics(METRICS)
    assert (m.drafts, m.draft_tokens, m.accepted_tokens) == (16.0, 48.0, 20.0)
    assert m.accepted_per_position == [12.0, 6.0, 2.0]
    assert m.acceptance_length == pytest.approx(1 + 20 / 16)
    assert m.acceptance_rate == pytest.approx(20 / 48)
    assert m.position_rates == pytest.approx([12 / 16, 6 / 16, 2 / 16])


def test_metrics_difference_and_empty_reading() -> None:
    before = serve.parse_spec_metrics("")
    assert before.acceptance_length is None and before.accepted_per_position == []
    moved = serve.parse_spec_metrics(METRICS).minus(before)
    assert moved.accepted_per_position == [12.0, 6.0, 2.0]
    assert moved.minus(moved).drafts == 0.0


def test_port_is_free_sees_a_listener() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not serve.port_is_free(port)
    assert serve.port_is_free(port)


def test_tokenizer_fills_the_tiny_vocab_and_has_a_chat_template(
    tmp_path: Path,
) -> None:
    from transformers import AutoTokenizer

    tiny.build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == tiny.TINY_TARGET["vocab_size"]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Write a short poem."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert tok.decode([100, 200], skip_special_tokens=True) == "w100 w200"


def test_echo_drafter_proposes_the_last_token(tmp_path: Path) -> None:
    """Plain-PyTorch DFlash with the echo weights drafts "repeat the last
    token" at every position, whatever the context."""
    import torch

    from tests.e2e.reference import draft_logits

    target = tiny.build_echo_target(tmp_path / "target")
    drafter = tiny.build_echo_drafter(tmp_path / "drafter", target)
    layers = tiny.TinyDrafter().target_layer_ids
    features = torch.randn(12, len(layers) * tiny.TINY_TARGET["hidden_size"])
    for token in (9, 100, 300, 510):
        drafts = draft_logits(drafter, target, features, token, 7).argmax(-1)
        assert drafts.tolist() == [token] * 7
