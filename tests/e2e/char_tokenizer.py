"""A real character-level tokenizer (``tokenizers`` library) for tiny targets.

Every id below ``vocab_size`` is one character or one special token, so the
whole vocabulary fits a target with vocabulary 64; the characters cover JSON
(``{}[]":,.-``, digits, letters, space), so vLLM's structured outputs can
constrain decoding with it. Saved next to the target's weights, vLLM loads it
as the target's tokenizer.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models

CHARS = '{}[]":,.- ' + string.digits + string.ascii_lowercase + string.ascii_uppercase


def build_char_tokenizer(
    path: Path, vocab_size: int, specials: dict[int, str], eos: str
) -> Tokenizer:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``path``.

    ``specials`` places special tokens at chosen ids (``eos`` among them);
    the other ids take characters of ``CHARS`` in order.
    """
    chars = iter(CHARS)
    vocab = {
        specials[i] if i in specials else next(chars): i for i in range(vocab_size)
    }
    unk = next(s for s in specials.values() if "unk" in s)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tokenizer.decoder = decoders.Fuse()  # ids decode to their characters, joined
    tokenizer.add_special_tokens(list(specials.values()))
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": eos,
                "unk_token": unk,
                "model_max_length": 4096,
            }
        )
    )
    return tokenizer
