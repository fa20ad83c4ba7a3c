"""Override lists for `load_config` that more than one place uses."""

# The test-sized model: a 2-layer, 32-wide transformer on 32-token windows, one CPU thread, no logging to
# speak of. It trains 30 steps in about a second, so the suite and the fault benchmarks (recovery,
# stability) can run whole training runs by the dozen. Later overrides win over these.
TEST_MODEL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32",
    "data.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=8", "train.steps=30",
    "train.eval_every=0", "train.eval_batches=2", "schedule.warmup_steps=5", "optim.lr=3e-3",
    "logging.wandb.mode=disabled", "logging.progress=false", "logging.log_every=1000", "train.cpu_threads=1",
]
