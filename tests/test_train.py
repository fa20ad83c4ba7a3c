"""The single-process trainer: it learns, it is deterministic, and layouts of the batch do not matter."""
import json

import pytest

from keel.training.loop import train


def losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "step"]


def test_short_run_learns_and_writes_its_run_directory(tiny_config):
    cfg = tiny_config("train.eval_every=15")
    summary = train(cfg)
    assert summary.val_loss < summary.first_val_loss - 1.0  # from ~ln(256)=5.5, well down
    run_dir = summary.run_dir
    assert (run_dir / "config.yaml").is_file()
    steps = losses(run_dir)
    assert len(steps) == 30 and steps[-1] < steps[0] - 1.0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 15, 30]
    step = next(r for r in records if r["kind"] == "step")
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "mfu", "peak_mem_gb", "tokens"} <= step.keys()
    events = [json.loads(line)["kind"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert events == ["run_start", "run_end"]


def test_same_seed_gives_identical_losses(tiny_config):
    a = losses(train(tiny_config("train.steps=8")).run_dir)
    b = losses(train(tiny_config("train.steps=8")).run_dir)
    c = losses(train(tiny_config("train.steps=8", "train.seed=1")).run_dir)
    assert a == b and a != c


def test_gradient_accumulation_matches_one_big_micro_batch(tiny_config):
    whole = losses(train(tiny_config("train.steps=8", "train.micro_batch_size=8")).run_dir)
    accumulated = losses(train(tiny_config("train.steps=8", "train.micro_batch_size=2")).run_dir)
    assert accumulated == pytest.approx(whole, rel=1e-5)


def test_bf16_autocast_trains(tiny_config):
    summary = train(tiny_config("train.steps=10", "train.precision=bf16"))
    assert summary.val_loss < summary.first_val_loss


def test_wandb_offline_writes_a_local_run(tiny_config, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    summary = train(tiny_config("train.steps=3", "logging.wandb.mode=offline"))
    assert list((summary.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_recomputes_without_changing_losses(tiny_config, mode):
    plain = losses(train(tiny_config("train.steps=5")).run_dir)
    checkpointed = losses(train(tiny_config("train.steps=5", f"parallel.activation_checkpoint={mode}")).run_dir)
    assert checkpointed == pytest.approx(plain, rel=1e-6)


def test_compiled_blocks_train_to_the_same_losses(tiny_config):
    plain = losses(train(tiny_config("train.steps=3")).run_dir)
    compiled = losses(train(tiny_config("train.steps=3", "parallel.compile=true")).run_dir)
    assert compiled == pytest.approx(plain, rel=1e-4)
