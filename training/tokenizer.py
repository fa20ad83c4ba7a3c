"""Tokenizers: raw bytes (the default, nothing to download or train) and a BPE trained locally."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

EOT_TEXT = "<|endoftext|>"


class ByteTokenizer:
    """Each UTF-8 byte is a token. Byte 0 (NUL, absent from text) separates documents."""

    name = "byte"
    vocab_size = 256
    eot = 0

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        pass


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` package (the GPT-2 scheme: no unknown tokens, ever)."""

    name = "bpe"
    FILE = "tokenizer.json"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eot = tokenizer.token_to_id(EOT_TEXT)

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, directory: Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(Path(directory) / cls.FILE)))

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text).ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        self._tok.save(str(Path(directory) / self.FILE))


def load_tokenizer(name: str, directory: Path | None = None):
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        return BPETokenizer.load(directory)
    raise ValueError(f"unknown tokenizer {name!r}; choose 'byte' or 'bpe'")
