"""The DeepSpeed engine (parallel.engine: deepspeed): data parallel with ZeRO stage 1, 2 or 3, optionally
with the optimizer on the CPU, built from keel's config and driven by keel's loop.

keel keeps what it owns: the model and its first weights (the same values as one process), AdamW and its
parameter groups, the learning-rate schedule (set on the optimizer before each step), autocast to the
training precision (DeepSpeed runs the fp32 master weights), the micro-batch loop, and gradient-norm
clipping by DeepSpeed's own `gradient_clipping`. DeepSpeed owns the partitioning and the collectives.

Two things keel's loop needs that DeepSpeed has no public call for, taken from its ZeRO optimizers:
- the global gradient norm before the step (the spike detector judges it before deciding to step): the
  same norm DeepSpeed's step computes, asked of the optimizer after the boundary backward;
- dropping a step's gradients without applying them (a skipped step): DeepSpeed's own path for a
  non-finite gradient norm, which frees the gradients and leaves weights and optimizer state untouched.
Both are pinned by tests (tests/test_deepspeed.py) against the installed DeepSpeed version.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import torch
import torch.distributed as dist

from ..training.config import Config
from ..training.errors import ConfigError
from ..training.model import build_model
from .data_parallel import apply_activation_checkpointing
from .dims import ParallelDims
from .engine import Engine, adamw
from .materialise import materialise


def ds_config(cfg: Config, dp_size: int) -> dict:
    """The DeepSpeed config of a keel config: batch sizes, ZeRO stage and offload, clipping, then the
    user's parallel.deepspeed keys merged over it (the keys keel derives are refused there at config time)."""
    p, t = cfg.parallel, cfg.train
    zero = {"stage": p.zero_stage}
    if p.zero_offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return merged({
        # With the optimizer offloaded DeepSpeed insists on its own CPU Adam (a C++ op it JIT-compiles, ~1
        # minute per new machine) unless told otherwise; keel's AdamW is torch's fused CPU kernel, and
        # keeps the update the same as every other engine's.
        "zero_force_ds_cpu_optimizer": False,
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # keel's torch AdamW, so that nothing is JIT-compiled
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }, p.deepspeed)


def merged(base: dict, extra: dict) -> dict:
    """`extra` over `base`; a mapping in both is merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _config_error(e: Exception) -> bool:
    """Whether DeepSpeed raised `e` over its config: its config errors, ZeRO's refusals and pydantic's
    validation of its config models. A restart would only repeat them."""
    from deepspeed.runtime.config import DeepSpeedConfigError
    from deepspeed.runtime.zero.utils import ZeRORuntimeException
    from pydantic import ValidationError

    return isinstance(e, (DeepSpeedConfigError, ZeRORuntimeException, ValidationError))


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: Config, device: torch.device, dims: ParallelDims):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        if device.type == "cpu":
            # DeepSpeed's shared-memory all-reduce serves only its inference_all_reduce; training's
            # collectives go through torch.distributed. Left on, every new machine JIT-compiles it (~45 s)
            # at the first initialize. DeepSpeed keeps this dict for such edits (deepspeed/ops/__init__.py).
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        self.cfg, self.device, self.dims = cfg, device, dims
        self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        model = build_model(cfg.model, device="meta")
        if cfg.parallel.activation_checkpoint != "none":
            apply_activation_checkpointing(model, cfg.parallel.activation_checkpoint)
        materialise(model, device, cfg.train.seed)
        optimizer = adamw(model, cfg, device)
        config = ds_config(cfg, self.dp_size)
        try:
            self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                                 dist_init_required=False)
        except Exception as e:  # noqa: BLE001 - narrowed below to what the config caused
            if not _config_error(e):
                raise
            message = " ".join(str(e).split()).split(" For further information")[0]  # pydantic's link
            raise ConfigError(f"DeepSpeed refused its config ({type(e).__name__}: {message[:300]}); check "
                              f"parallel.deepspeed and parallel.zero_* (keel's part of it: ds_config in "
                              f"parallel/deepspeed.py)") from e
        self.model = self.ds
        self.stage = cfg.parallel.zero_stage

    # -- the micro-batch loop's hooks (parallel/engine.py) ------------------------------------------------
    def before_micro_batch(self, index: int, count: int) -> None:
        # keel steps once per global batch: only the last micro-batch's backward reduces the gradients.
        self.ds.set_gradient_accumulation_boundary(index == count - 1)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the loop has divided by the micro-batch count

    def global_mean(self, local_mean: torch.Tensor) -> float:
        dist.all_reduce(local_mean, op=dist.ReduceOp.AVG)
        return local_mean.item()

    # -- the rest of the interface ----------------------------------------------------------------------
    def _norm(self) -> torch.Tensor:
        from deepspeed.runtime.utils import combine_grad_norm_groups

        opt = self.ds.optimizer
        if self.stage == 3:
            return combine_grad_norm_groups(opt._get_norm_groups())
        return opt.scaled_global_norm()

    def clip_grad_norm(self, max_norm: float) -> float:
        # The clipping itself happens inside DeepSpeed's step, to its gradient_clipping: optim.grad_clip,
        # the max_norm the loop passes.
        return float(self._norm()) / self.ds.optimizer.loss_scale

    def optimizer_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ds.step()

    def zero_grad(self) -> None:
        # DeepSpeed drops a step whose gradient norm is not finite (freeing the gradients, leaving weights
        # and optimizer state as they were): present it with one.
        with self._non_finite_norm():
            self.ds.step()

    @contextlib.contextmanager
    def _non_finite_norm(self):
        opt = self.ds.optimizer
        name = "_get_norm_groups" if self.stage == 3 else "scaled_global_norm"
        nan = torch.tensor(float("nan"), device=self.device)
        setattr(opt, name, (lambda *a, **k: [nan]) if self.stage == 3 else (lambda *a, **k: nan))
        try:
            yield
        finally:
            delattr(opt, name)

    # -- checkpoints: DeepSpeed's own sharded files, inside keel's atomic commit and manifest -----------
    native_checkpoint = True

    def save_native(self, folder: Path) -> list[str]:
        """Every rank, together: DeepSpeed writes its files straight into `folder` (its tag is the folder's
        name). Returns the names this rank wrote: its own ZeRO shards, and on rank 0 the rest (the module
        states, DeepSpeed's recovery scripts)."""
        before = {p.name for p in folder.iterdir()}
        self.ds.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)
        written = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in before)
        shard = re.compile(r"^zero_pp_rank_(\d+)_")
        return [n for n in written if (m := shard.match(n)) and int(m.group(1)) == self.dp_rank] + \
            ([n for n in written if not shard.match(n)] if self.dp_rank == 0 else [])

    def load_native(self, folder: Path) -> None:
        self.ds.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                load_lr_scheduler_states=False, load_module_strict=True)

    def state_dict(self) -> dict:
        raise NotImplementedError("the DeepSpeed engine checkpoints through save_native / load_native")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("the DeepSpeed engine checkpoints through save_native / load_native")
