"""Tokenizers round-trip text exactly; a user's Hugging Face tokenizer.json prepares a corpus that decodes back."""
import json
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from keel.training.config import ConfigError, load_config
from keel.training.corpus import DataError, prepare
from keel.training.presets import TEST_MODEL
from keel.training.tasks import corpus_tokenizer
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


# ---- a Hugging Face tokenizer.json brought by the user ---------------------------------------------------

DOCS = [f"def f{i}(x):\n    return x * {i}  # ünï {i}\n" * (1 + i % 4) for i in range(40)]


def hf_tokenizer(folder, specials=("<s>", "</s>"), vocab_size=300, bos="<s>"):
    """A real tokenizers BPE saved as folder/tokenizer.json, Llama-style: no <|endoftext|>, and a
    post-processor that puts <s> before every encoding (which a corpus must not get)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(DOCS * 3, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    if bos in specials:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


def split_documents(out, split):
    tok, meta = corpus_tokenizer(out)
    tokens = np.concatenate([np.fromfile(out / s["file"], dtype=meta["dtype"])
                             for s in meta["splits"][split]["shards"]])
    ends = np.flatnonzero(tokens == meta["eot"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[a:b]) for a, b in zip(starts, ends)], tokens, meta


def test_a_user_tokenizer_json_is_recorded_copied_and_decodes_the_corpus_back(tmp_path):
    original = hf_tokenizer(tmp_path / "llama-ish")
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    meta = prepare([src], tmp_path / "out", tokenizer=str(tmp_path / "llama-ish"), val_percent=20, progress=False)
    assert meta["tokenizer"] == "hf:llama-ish" and meta["eot_token"] == "</s>"
    assert meta["eot"] == original.token_to_id("</s>") and meta["vocab_size"] == original.get_vocab_size()
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (tmp_path / "llama-ish" / "tokenizer.json").read_text()
    train, train_tokens, _ = split_documents(tmp_path / "out", "train")
    val, _, _ = split_documents(tmp_path / "out", "val")
    assert sorted(train + val) == sorted(DOCS) and not set(train) & set(val)
    bos = original.token_to_id("<s>")
    assert original.encode("x").ids[0] == bos and bos not in train_tokens  # the tokenizer's own BOS is not added
    # The same file given directly, not its folder, names the tokenizer by the folder.
    meta = prepare([src], tmp_path / "out2", tokenizer=str(tmp_path / "llama-ish" / "tokenizer.json"), progress=False)
    assert meta["tokenizer"] == "hf:llama-ish"


def test_the_end_of_text_token_is_the_configured_eos_else_a_common_spelling_else_named(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    hf_tokenizer(tmp_path / "gpt", specials=("<|endoftext|>", "<|im_end|>"))
    meta = prepare([src], tmp_path / "a", tokenizer=str(tmp_path / "gpt"), progress=False)
    assert meta["eot_token"] == "<|endoftext|>"
    (tmp_path / "gpt" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    assert prepare([src], tmp_path / "b", tokenizer=str(tmp_path / "gpt"), progress=False)["eot_token"] == "<|im_end|>"

    hf_tokenizer(tmp_path / "odd", specials=("<sep>",))
    with pytest.raises(DataError, match=r"has no end-of-text token .*; name one with --eot TOKEN"):
        prepare([src], tmp_path / "c", tokenizer=str(tmp_path / "odd"), progress=False)
    meta = prepare([src], tmp_path / "c", tokenizer=str(tmp_path / "odd"), eot="<sep>", progress=False)
    assert meta["eot_token"] == "<sep>"
    assert split_documents(tmp_path / "c", "train")[2]["eot"] == meta["eot"]  # reloads with the named token
    with pytest.raises(DataError, match=r"'<nope>' is not in the vocabulary.*--eot TOKEN"):
        prepare([src], tmp_path / "d", tokenizer=str(tmp_path / "odd"), eot="<nope>", progress=False)
    assert not (tmp_path / "c").with_name(".c.partial").exists() and not (tmp_path / "d").exists()


def test_a_bad_tokenizer_path_is_one_line_from_the_cli(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.json").write_text('{"not": "a tokenizer"}')
    for tokenizer, said in ((tmp_path / "missing.json", "is neither 'byte', 'bpe' nor an existing path"),
                            (tmp_path / "empty", "holds no tokenizer.json"),
                            (tmp_path / "junk.json", "is not a Hugging Face tokenizers file")):
        result = subprocess.run([sys.executable, "-m", "keel.launcher.cli", "data", "prepare", str(src), "--out",
                                 str(tmp_path / "out"), "--tokenizer", str(tokenizer)], capture_output=True, text=True)
        assert result.returncode == 2 and said in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("keel: error: ")
        assert not (tmp_path / "out").exists()


def test_training_refuses_a_corpus_whose_tokenizer_outgrows_the_model(tmp_path):
    from keel.training.loop import resolve_data

    tok = hf_tokenizer(tmp_path / "big", specials=("<|endoftext|>",), vocab_size=400)
    assert tok.get_vocab_size() > 256
    prepare([write_jsonl(tmp_path / "docs.jsonl", DOCS)], tmp_path / "out", tokenizer=str(tmp_path / "big"),
            progress=False)
    small = load_config(None, [*TEST_MODEL, f"data.path={tmp_path / 'out'}", "model.vocab_size=256"])
    with pytest.raises(ConfigError, match=rf"the hf:big tokenizer .* has {tok.get_vocab_size()} tokens but "
                                          rf"model.vocab_size=256; set model.vocab_size={tok.get_vocab_size()}"):
        resolve_data(small)
    fits = load_config(None, [*TEST_MODEL, f"data.path={tmp_path / 'out'}", f"model.vocab_size={tok.get_vocab_size()}"])
    assert resolve_data(fits) == tmp_path / "out"
