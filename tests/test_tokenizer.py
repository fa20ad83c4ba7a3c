"""Tokenizers round-trip text exactly."""
from keel.training.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

TEXT = "def f(x):\n    return x ** 2  # ünïcödé ✓ 你好\n"


def test_byte_tokenizer_round_trips_any_utf8():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode("utf-8")) and ids.max() < tok.vocab_size == 256
    assert tok.decode(ids) == TEXT


def test_bpe_trained_locally_round_trips_and_compresses(tmp_path):
    corpus = [TEXT * 3, "import os\nimport sys\n" * 20, "for i in range(10):\n    print(i)\n" * 20]
    tok = BPETokenizer.train(iter(corpus * 10), vocab_size=300)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode("utf-8"))  # merges were learned
    tok.save(tmp_path)
    again = load_tokenizer("bpe", tmp_path)
    assert list(again.encode(TEXT)) == list(ids) and again.eot == tok.eot
