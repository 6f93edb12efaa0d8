import pytest

from raycap.text import SPECIALS, Vocabulary, standardize, words


def test_standardize_lowercases_and_strips_punctuation():
    assert standardize("  A Red, Circle!  on the LEFT.") == "a red circle on the left"
    assert standardize("man's hat-stand") == "mans hatstand"


def test_vocabulary_keeps_top_k_with_specials_first_and_unk_for_the_rest():
    vocab = Vocabulary.build(["a b b c c c", "c d"], max_size=len(SPECIALS) + 2)
    assert vocab.tokens[:4] == SPECIALS
    assert vocab.tokens[4:] == ("c", "b")  # by frequency; "a" and "d" fall out
    assert vocab.pad_id == 0
    ids = vocab.encode("A d c")
    assert ids == [vocab.start_id, vocab.id("<unk>"), vocab.id("<unk>"), vocab.id("c"), vocab.end_id]
    assert vocab.id("never seen") == 1


def test_encode_decode_round_trip_and_truncation():
    vocab = Vocabulary.build(["a red circle on the left"])
    ids = vocab.encode("A red circle on the left")
    assert vocab.decode(ids) == words("a red circle on the left")
    assert len(vocab.encode("a red circle on the left", max_length=4)) == 4
    assert vocab.decode([vocab.start_id, vocab.id("red"), vocab.end_id, vocab.id("circle")]) == ["red"]


def test_json_round_trip_and_ties_are_alphabetical():
    vocab = Vocabulary.build(["b a", "a b"])
    assert vocab.tokens[4:] == ("a", "b")
    assert Vocabulary.from_json(vocab.to_json()) == vocab


def test_bad_vocabularies_are_rejected():
    with pytest.raises(ValueError):
        Vocabulary(("a", "b"))
    with pytest.raises(ValueError):
        Vocabulary.build(["a"], max_size=3)
