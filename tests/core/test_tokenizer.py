"""The word tokenizer: vocabulary from training captions, encode/decode round trips."""

from __future__ import annotations

import pytest

from captioner.core.tokenizer import Tokenizer, split_words

CAPTIONS = ["A red circle, left of a blue square.", "There is a red triangle!", "a red circle"]


def test_split_lowercases_and_separates_punctuation() -> None:
    assert split_words("A Red circle, left of (it).") == [
        "a", "red", "circle", ",", "left", "of", "(", "it", ")", ".",
    ]  # fmt: skip


def test_specials_come_first() -> None:
    tok = Tokenizer.build(CAPTIONS)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.itos[4] == "a"  # the most frequent word comes next


@pytest.mark.parametrize("text", [*CAPTIONS, "a blue square, there is (a) red circle."])
def test_round_trip(text: str) -> None:
    tok = Tokenizer.build([*CAPTIONS, "(", ")"])
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.unk_id not in ids
    assert tok.decode(ids) == " ".join(split_words(text)).replace(" ,", ",").replace(
        " .", "."
    ).replace(" !", "!").replace("( ", "(").replace(" )", ")")


def test_min_freq_and_unknown_words() -> None:
    tok = Tokenizer.build(CAPTIONS, min_freq=2)
    assert "red" in tok.stoi and "triangle" not in tok.stoi
    assert tok.encode("a red triangle")[3] == tok.unk_id
    assert tok.decode(tok.encode("a red triangle")) == "a red <unk>"


def test_decode_stops_at_eos_and_skips_padding() -> None:
    tok = Tokenizer.build(CAPTIONS)
    ids = [tok.bos_id, tok.stoi["red"], tok.eos_id, tok.stoi["circle"], tok.pad_id]
    assert tok.decode(ids) == "red"


def test_max_len_cuts_words_but_keeps_eos() -> None:
    tok = Tokenizer.build(CAPTIONS)
    ids = tok.encode("a red circle left of a blue square", max_len=5)
    assert len(ids) == 5 and ids[-1] == tok.eos_id


def test_state_round_trips_through_plain_types() -> None:
    tok = Tokenizer.build(CAPTIONS)
    state = tok.to_dict()
    assert all(isinstance(w, str) for w in state["itos"])
    again = Tokenizer.from_dict(state)
    assert again.itos == tok.itos and again.encode(CAPTIONS[0]) == tok.encode(CAPTIONS[0])


def test_bad_min_freq_and_empty_vocabulary() -> None:
    with pytest.raises(ValueError, match="min_freq"):
        Tokenizer.build(CAPTIONS, min_freq=0)
    with pytest.raises(ValueError, match="lower data.min_freq"):
        Tokenizer.build(CAPTIONS, min_freq=100)
