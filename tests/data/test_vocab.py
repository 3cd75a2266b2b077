"""One vocabulary for all roles: fingerprints, padded embeddings, mismatches refused."""

from __future__ import annotations

import pytest

from deltakd.data.vocab import check_vocabulary, load_tokenizer, tokenizer_fingerprint
from deltakd.errors import VocabularyError
from tests.conftest import make_model, train_tokenizer


@pytest.fixture(scope="module")
def odd_world(tmp_path_factory, tiny_world):
    """Models with padded / short embeddings and one with a different tokenizer."""
    root = tmp_path_factory.mktemp("odd_world")
    v = tiny_world["vocab_size"]
    tok = load_tokenizer(str(tiny_world["tokenizer"]))
    out = {}
    for name, rows in (("padded_13", v + 13), ("padded_7", v + 7), ("short", v - 5)):
        out[name] = make_model(root / name, rows, hidden=16, layers=1, seed=5)
        tok.save_pretrained(out[name])
    other = train_tokenizer(root / "other_tok", vocab_size=300)
    out["other"] = make_model(root / "other", len(other), hidden=16, layers=1, seed=6)
    other.save_pretrained(out["other"])
    return out


def test_padded_embeddings_are_accepted_and_sliced_to_tokenizer(tiny_world, odd_world):
    tok = load_tokenizer(str(tiny_world["tokenizer"]))
    info = check_vocabulary(tok, {"teacher_ft": str(odd_world["padded_13"]),
                                  "student_raw": str(odd_world["padded_7"])})  # fmt: skip
    assert info.vocab_size == len(tok) == tiny_world["vocab_size"]
    assert info.rows == {"teacher_ft": len(tok) + 13, "student_raw": len(tok) + 7}


def test_different_tokenizer_is_refused(tiny_world, odd_world):
    tok = load_tokenizer(str(tiny_world["tokenizer"]))
    with pytest.raises(
        VocabularyError, match=r"role 'teacher_raw' .* different tokenizer.*one family"
    ):
        check_vocabulary(tok, {"teacher_raw": str(odd_world["other"])})


def test_too_few_embedding_rows_is_refused(tiny_world, odd_world):
    tok = load_tokenizer(str(tiny_world["tokenizer"]))
    with pytest.raises(VocabularyError, match=r"has \d+ embedding rows but the tokenizer has \d+"):
        check_vocabulary(tok, {"student_raw": str(odd_world["short"])})


def test_fingerprint_ignores_chat_template(tiny_world):
    a = load_tokenizer(str(tiny_world["tokenizer"]))
    b = load_tokenizer(str(tiny_world["tokenizer"]))
    b.chat_template = "{{ messages }}"
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)
