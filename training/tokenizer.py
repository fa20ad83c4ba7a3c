"""Tokenizers: raw bytes (the default, nothing to download or train), a BPE trained locally, and any Hugging
Face `tokenizers` file (tokenizer.json) the user brings.

A prepared corpus names its tokenizer in meta.json ("byte", "bpe" or "hf:<name>") and, for the last two,
holds a copy of the tokenizer.json, so whatever reads the corpus later decodes it with `load_tokenizer`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

EOT_TEXT = "<|endoftext|>"
# Spellings of "end of text" in common tokenizers (GPT-2/NeoX, Llama 2/T5/Mistral, Llama 3, Gemma), tried
# in this order after the eos_token a tokenizer_config.json beside the tokenizer.json names.
EOT_CANDIDATES = (EOT_TEXT, "</s>", "<|end_of_text|>", "<eos>")
FILE = "tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot be used, with the fix (corpus.py reports it as a DataError)."""


class ByteTokenizer:
    """Each UTF-8 byte is a token. Byte 0 (NUL, absent from text) separates documents."""

    name = "byte"
    vocab_size = 256
    eot = 0
    eot_text = "\\x00"

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def encode_documents(self, texts: list[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
        """All documents as one array with the end-of-text token after each, and each one's length (eot
        included)."""
        data = [t.encode("utf-8") if isinstance(t, str) else t for t in texts]
        joined = b"\0".join(data) + b"\0"
        return np.frombuffer(joined, dtype=np.uint8), np.array([len(d) + 1 for d in data], dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        pass

    def spec(self) -> tuple:
        return ("byte",)


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer. Documents are encoded without the tokenizer's own special
    tokens (no BOS): the corpus puts exactly one end-of-text token after each document itself."""

    def __init__(self, json_text: str, name: str, eot_text: str | None = None):
        from tokenizers import Tokenizer

        self.json_text, self.name = json_text, name
        self._tok = Tokenizer.from_str(json_text)
        self.eot_text = eot_text or EOT_TEXT
        self.eot = self._tok.token_to_id(self.eot_text)
        if self.eot is None:
            raise TokenizerError(f"token {self.eot_text!r} is not in the vocabulary of tokenizer {name}; name "
                                 f"its end-of-text token with --eot TOKEN")
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), self.eot + 1)

    @classmethod
    def from_path(cls, path: str | Path, eot_text: str | None = None) -> "HFTokenizer":
        """A user's tokenizer: a tokenizer.json file, or a folder holding one (and perhaps its
        tokenizer_config.json, whose eos_token is the end-of-text token unless `eot_text` says otherwise)."""
        path = Path(path)
        file = path / FILE if path.is_dir() else path
        if not file.is_file():
            raise TokenizerError(f"{path} holds no {FILE}; pass a Hugging Face tokenizer.json file or a folder "
                                 f"holding one (save one with tokenizer.save_pretrained(DIR))")
        label = file.parent.name if file.stem == "tokenizer" and file.parent.name else file.stem
        try:
            json_text = file.read_text()
            vocab = _token_names(json_text)
        except Exception as e:  # tokenizers raises a plain Exception on a file it cannot parse
            raise TokenizerError(f"{file} is not a Hugging Face tokenizers file ({e}); pass a tokenizer.json "
                                 f"written by tokenizers or transformers") from e
        return cls(json_text, f"hf:{label}", eot_text or find_eot(file, vocab))

    @classmethod
    def load(cls, directory: Path, name: str) -> "HFTokenizer":
        directory = Path(directory)
        meta = directory / "meta.json"
        eot_text = json.loads(meta.read_text()).get("eot_token") if meta.is_file() else None
        return cls((directory / FILE).read_text(), name, eot_text)

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_documents(self, texts: list[str | bytes]) -> tuple[np.ndarray, np.ndarray]:
        texts = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
        ids = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        lengths = np.array([len(i) + 1 for i in ids], dtype=np.int64)
        out = np.empty(int(lengths.sum()), dtype=np.int64)
        at = 0
        for doc in ids:
            out[at:at + len(doc)] = doc
            at += len(doc)
            out[at] = self.eot
            at += 1
        return out, lengths

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        (Path(directory) / FILE).write_text(self.json_text)

    def spec(self) -> tuple:
        """What a worker process needs to rebuild this tokenizer (the object itself holds Rust state)."""
        return ("hf", self.json_text, self.name, self.eot_text)


def find_eot(file: Path, vocab: set[str]) -> str:
    """The end-of-text token of a user's tokenizer: its configured eos, else the first common spelling."""
    config = file.parent / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except (ValueError, AttributeError):
            eos = None  # unreadable: fall back to the common spellings
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str) and eos in vocab:
            return eos
    for candidate in EOT_CANDIDATES:
        if candidate in vocab:
            return candidate
    raise TokenizerError(f"tokenizer {file} has no end-of-text token (no eos_token in a tokenizer_config.json "
                         f"beside it, none of {', '.join(EOT_CANDIDATES)}); name one with --eot TOKEN")


def _token_names(json_text: str) -> set[str]:
    from tokenizers import Tokenizer

    return set(Tokenizer.from_str(json_text).get_vocab(with_added_tokens=True))


class BPETokenizer(HFTokenizer):
    """Byte-level BPE trained here with `tokenizers` (the GPT-2 scheme: no unknown tokens, ever)."""

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
        return cls(tok.to_str(), "bpe", EOT_TEXT)

    @classmethod
    def load(cls, directory: Path, name: str = "bpe") -> "BPETokenizer":
        return cls((Path(directory) / FILE).read_text(), "bpe", EOT_TEXT)


def tokenizer_from_spec(spec: tuple):
    return ByteTokenizer() if spec[0] == "byte" else HFTokenizer(*spec[1:])


def load_tokenizer(name: str, directory: Path | None = None):
    """The tokenizer of a prepared corpus, from the name its meta.json records and the folder."""
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        return BPETokenizer.load(directory)
    if name.startswith("hf:"):
        return HFTokenizer.load(directory, name)
    raise ValueError(f"unknown tokenizer {name!r}; choose 'byte', 'bpe' or a tokenizer.json")
