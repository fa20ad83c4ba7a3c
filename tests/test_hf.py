"""Hugging Face round trip: a keel checkpoint exported with `--to hf` is a `LlamaForCausalLM` to
`transformers` (same logits, same greedy text, same tokenizer), and an HF Llama folder starts a keel run
(`model.init_from: hf:PATH`) with exactly its weights, in any parallel layout.

Everything is real: checkpoints written by training, folders loaded by `transformers` itself, models
created locally by `transformers` from a config (nothing is downloaded).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from keel.checkpoints.export import full_model_state
from keel.launcher.cli import main as keel
from keel.training.config import ConfigError, load_config
from keel.training.corpus import prepare, stdlib_path
from keel.training.data import BatchLoader, TokenWindows
from keel.parallel.local import LocalEngine
from keel.training.generate import complete, load_checkpoint_model
from keel.training.loop import train
from keel.training.presets import TEST_MODEL
from keel.training.tasks import corpus_tokenizer

ROOT = Path(__file__).parent.parent
TEXT = "def parse(self, fp, headersonly=False):\n    \"\"\"Create a message structure from the data in a file."


@pytest.fixture(scope="module")
def bpe_corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "email-bpe"
    prepare([stdlib_path() / "email"], out, tokenizer="bpe", vocab_size=512, val_percent=20, progress=False)
    return out


def trained(tmp_path: Path, corpus: Path, *overrides: str) -> Path:
    """A keel checkpoint after 10 steps of the test model on `corpus`."""
    cfg = load_config(None, [*TEST_MODEL, f"data.path={corpus}", f"train.output_dir={tmp_path}", "train.name=run",
                             "model.vocab_size=512", "train.steps=10", "checkpoint.interval=10", *overrides])
    train(cfg)
    return tmp_path / "run" / "checkpoints" / "step_0000010"


def export(ckpt: Path, out: Path, *args: str) -> Path:
    keel(["ckpt", "export", str(ckpt), "--to", "hf", str(out), *args])
    return out


def real_text_batch(corpus: Path, rows: int = 4, seq_len: int = 32) -> torch.Tensor:
    windows = TokenWindows(corpus, "val", seq_len)
    return torch.stack([torch.from_numpy(windows[i][:seq_len].astype("int64")) for i in range(rows)])


@pytest.mark.parametrize("shape", ["gqa", "gqa, tied embeddings"])
def test_an_hf_export_is_a_llama_to_transformers_with_keels_logits_and_greedy_text(shape, bpe_corpus, tmp_path):
    tied = ["model.tie_embeddings=true"] if "tied" in shape else []
    ckpt = trained(tmp_path, bpe_corpus, *tied)  # the test model has 4 query heads and 2 key/value heads
    out = export(ckpt, tmp_path / "hf")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))

    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings == bool(tied)
    ours, _ = load_checkpoint_model(ckpt)
    tokens = real_text_batch(bpe_corpus)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-4, rtol=0)

    # The tokenizer travels too: transformers encodes text to the ids keel trained on.
    tok, _ = corpus_tokenizer(bpe_corpus)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(TEXT)["input_ids"] == tok.encode(TEXT).tolist()

    # Greedy text: `keel generate` and transformers' generate() pick the same tokens after the same prompt
    # (keel reads a prompt as a document's start: after the end-of-text token).
    _, ids = complete(ckpt, TEXT[:40], max_new_tokens=24)
    n_prompt = 1 + len(tok.encode(TEXT[:40]))
    hf_ids = hf.generate(torch.tensor([ids[:n_prompt]]), max_new_tokens=24, do_sample=False,
                         pad_token_id=hf.config.eos_token_id)[0].tolist()
    assert hf_ids == ids and len(ids) > n_prompt


def test_keel_to_hf_to_keel_reproduces_every_weight_exactly(bpe_corpus, tmp_path):
    ckpt = trained(tmp_path, bpe_corpus)
    out = export(ckpt, tmp_path / "hf")
    # Model fields left out are read from config.json: the test model's sizes come from the export.
    cfg = load_config(None, [*TEST_MODEL, f"data.path={bpe_corpus}", f"model.init_from=hf:{out}",
                             f"train.output_dir={tmp_path}"])
    engine = LocalEngine(cfg, torch.device("cpu"))
    written = full_model_state(ckpt)
    for name, value in engine.model.state_dict().items():
        assert torch.equal(value, written[name]), name


def test_an_hf_bf16_export_holds_bf16_weights(bpe_corpus, tmp_path):
    out = export(trained(tmp_path, bpe_corpus), tmp_path / "hf", "--dtype", "bfloat16")
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> Path:
    """A Llama made by transformers from a config alone (no download), sized like the test model."""
    out = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      rope_theta=5000.0, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0,
                                      initializer_range=0.5)  # sharp attention: a wrong RoPE layout shows
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


def first_batch_loss_by_transformers(hf_folder: Path, corpus: Path, seed: int = 0) -> float:
    inputs, targets = next(iter(BatchLoader(TokenWindows(corpus, "train", 32), 8, seed=seed)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder)
    with torch.no_grad():
        logits = hf(inputs).logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()


def step_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "step"]


def test_an_hf_llama_trains_in_keel_from_its_weights_with_transformers_first_loss(hf_llama, corpus_dir, tmp_path):
    cfg = load_config(None, [*TEST_MODEL, f"data.path={corpus_dir}", f"train.output_dir={tmp_path}",
                             "train.name=run", f"model.init_from=hf:{hf_llama}", "train.steps=5"])
    assert (cfg.model.ffn_dim, cfg.model.rope_theta, cfg.model.norm_eps) == (96, 5000.0, 1e-6)  # from config.json
    train(cfg)
    losses = step_losses(tmp_path / "run")
    assert losses[0] == pytest.approx(first_batch_loss_by_transformers(hf_llama, corpus_dir), abs=1e-4)
    assert losses[-1] < losses[0]  # and it trains from there


def test_an_hf_llama_starts_a_tensor_parallel_run_with_the_same_first_loss(hf_llama, corpus_dir, tmp_path):
    sets = [a for o in [*TEST_MODEL, f"data.path={corpus_dir}", f"train.output_dir={tmp_path}", "train.name=run",
                        f"model.init_from=hf:{hf_llama}", "train.steps=2", "parallel.tp=2"]
            for a in ("--set", o)]
    (tmp_path / "run.yaml").write_text("{}\n")  # everything is set below, the model from config.json
    result = subprocess.run([sys.executable, "-m", "keel.launcher.cli", "train", str(tmp_path / "run.yaml"),
                             "--nproc-per-node", "2",
                             "--launcher", "torchrun", *sets], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Each rank holds half the heads: the q/k rows it reads must be permuted before they are cut.
    assert step_losses(tmp_path / "run")[0] == pytest.approx(
        first_batch_loss_by_transformers(hf_llama, corpus_dir), abs=1e-4)


def test_a_model_section_that_disagrees_with_the_hf_config_is_refused_in_one_line(hf_llama):
    with pytest.raises(ConfigError, match=r"model.dim=64 but .* has hidden_size=32; leave model.dim out"):
        load_config(None, [f"model.init_from=hf:{hf_llama}", "model.dim=64", "data.seq_len=32"])


def test_hf_folders_keel_cannot_reproduce_are_refused_by_name(hf_llama, tmp_path):
    biased = tmp_path / "biased"
    biased.mkdir()
    config = json.loads((hf_llama / "config.json").read_text())
    (biased / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ConfigError, match="attention_bias=true"):
        load_config(None, [f"model.init_from=hf:{biased}", "data.seq_len=32"])
    with pytest.raises(ConfigError, match="has no config.json"):
        load_config(None, [f"model.init_from=hf:{tmp_path / 'missing'}"])


def test_a_qk_norm_model_is_refused_by_the_hf_export_by_name(corpus_dir, tmp_path, capsys):
    cfg = load_config(None, [*TEST_MODEL, f"data.path={corpus_dir}", f"train.output_dir={tmp_path}", "train.name=run",
                             "model.qk_norm=true", "train.steps=2", "checkpoint.interval=2"])
    train(cfg)
    with pytest.raises(SystemExit, match="model.qk_norm=true"):
        keel(["ckpt", "export", str(tmp_path / "run" / "checkpoints" / "step_0000002"), str(tmp_path / "hf")])
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_keel_generate_prints_the_greedy_continuation_and_samples_repeatably(bpe_corpus, tmp_path, capsys):
    ckpt = trained(tmp_path, bpe_corpus)
    capsys.readouterr()
    keel(["generate", str(tmp_path / "run"), "--prompt", "import ", "--max-new-tokens", "12"])
    greedy = capsys.readouterr().out
    assert greedy.startswith("import ") and len(greedy.rstrip("\n")) > len("import ")
    assert complete(ckpt, "import ", max_new_tokens=12)[0] == greedy.removeprefix("import ").rstrip("\n")
    sampled = [complete(ckpt, "import ", 12, temperature=1.0, top_k=20, seed=s)[1] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
