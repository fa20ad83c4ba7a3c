"""The single-process trainer: it learns, it is deterministic, and layouts of the batch do not matter."""
import json

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from keel.parallel.local import LocalEngine
from keel.training.loop import train
from keel.training.loss import model_loss


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


def test_given_an_event_sink_the_trainer_leaves_events_jsonl_to_it(tiny_config):
    # Under the supervisor, rank 0's events go to it (with the heartbeats), which is the file's one writer.
    sent = []
    summary = train(tiny_config("train.steps=4"), on_event=sent.append)
    assert not (summary.run_dir / "events.jsonl").exists()
    assert [e["kind"] for e in sent] == ["run_start", "run_end"]
    assert sent[0]["fresh"] is True and sent[0]["time"] <= sent[1]["time"]
    assert (summary.run_dir / "metrics.jsonl").is_file()


def test_same_seed_gives_identical_losses(tiny_config):
    a = losses(train(tiny_config("train.steps=8")).run_dir)
    b = losses(train(tiny_config("train.steps=8")).run_dir)
    c = losses(train(tiny_config("train.steps=8", "train.seed=1")).run_dir)
    assert a == b and a != c


def test_gradient_accumulation_matches_one_big_micro_batch(tiny_config):
    whole = losses(train(tiny_config("train.steps=8", "train.micro_batch_size=8")).run_dir)
    accumulated = losses(train(tiny_config("train.steps=8", "train.micro_batch_size=2")).run_dir)
    assert accumulated == pytest.approx(whole, rel=1e-5)


def test_bf16_autocast_trains_and_warns_where_the_cpu_has_no_native_bf16(tiny_config, capsys):
    summary = train(tiny_config("train.steps=10", "train.precision=bf16"))
    assert summary.val_loss < summary.first_val_loss
    emulated = not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert ("without native bf16 matmuls" in capsys.readouterr().out) == emulated


def test_bf16_runs_the_matmuls_in_bf16_and_keeps_fp32_weights_and_loss(tiny_config):
    cfg = tiny_config("train.precision=bf16")
    engine = LocalEngine(cfg, torch.device("cpu"))
    seen = {}
    for name in ("attention.wq", "feed_forward.w2"):
        module = engine.model.layers["0"].get_submodule(name)
        module.register_forward_hook(lambda m, args, out, name=name: seen.update({name: out.dtype}))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len))
    loss, ce = model_loss(engine.model, tokens, tokens, cfg.model, engine.compute_context)
    assert seen == {"attention.wq": torch.bfloat16, "feed_forward.w2": torch.bfloat16}
    assert {p.dtype for p in engine.model.parameters()} == {torch.float32}  # the optimizer's masters
    assert loss.dtype == ce.dtype == torch.float32  # the loss is taken in fp32


def test_wandb_offline_writes_a_local_run(tiny_config, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    summary = train(tiny_config("train.steps=3", "logging.wandb.mode=offline"))
    assert list((summary.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_recomputes_without_changing_losses(tiny_config, mode):
    plain = losses(train(tiny_config("train.steps=5")).run_dir)
    checkpointed = losses(train(tiny_config("train.steps=5", f"parallel.activation_checkpoint={mode}")).run_dir)
    assert checkpointed == pytest.approx(plain, rel=1e-6)


def saved_for_backward(cfg) -> tuple[int, list[bool]]:
    """Bytes of activations one forward keeps for the backward, and which blocks are checkpointed."""
    engine = LocalEngine(cfg, torch.device("cpu"))
    tokens = torch.randint(0, cfg.model.vocab_size, (8, cfg.data.seq_len))
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model_loss(engine.model, tokens, tokens, cfg.model, engine.compute_context)
    return total, [isinstance(block, CheckpointWrapper) for block in engine.model.layers.values()]


def test_activation_checkpointing_wraps_the_blocks_and_keeps_fewer_activations(tiny_config):
    plain, wrapped = saved_for_backward(tiny_config("model.n_layers=4"))
    selective, every_other = saved_for_backward(tiny_config("model.n_layers=4", "parallel.activation_checkpoint=selective"))
    full, every = saved_for_backward(tiny_config("model.n_layers=4", "parallel.activation_checkpoint=full"))
    assert wrapped == [False] * 4 and every_other == [True, False, True, False] and every == [True] * 4
    assert full < selective < plain and full < plain / 3


def test_compiled_blocks_train_to_the_same_losses(tiny_config):
    plain = losses(train(tiny_config("train.steps=3")).run_dir)
    compiled = losses(train(tiny_config("train.steps=3", "parallel.compile=true")).run_dir)
    assert compiled == pytest.approx(plain, rel=1e-4)
    engine = LocalEngine(tiny_config("parallel.compile=true"), torch.device("cpu"))
    # Module.compile() compiles each block in place (parameter names unchanged); the root is left eager.
    assert all(block._compiled_call_impl is not None for block in engine.model.layers.values())
    assert engine.model._compiled_call_impl is None
