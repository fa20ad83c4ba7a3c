"""Fused linear + cross-entropy (kernels/cross_entropy.py): loss, cross-entropy and both gradients of the
chunked (PyTorch) and triton (interpreter) implementations against an fp64 reference, and a measurement
that the chunked one never allocates the full [N, V] logits."""
import importlib.util

import pytest
import torch

from keel.kernels.cross_entropy import (CHUNK_LOGITS_BYTES, check_cross_entropy_impl, default_chunk_size,
                                        fused_linear_cross_entropy, resolve_cross_entropy_impl)
from keel.training.loss import lm_loss

IMPLS = ["chunked", "triton"]  # triton under the interpreter: `make test` installs it
TOLERANCES = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)]
DTYPE_IDS = ["fp32", "bf16"]
# N = 29 tokens in chunks of 8 (a ragged last chunk of 5); V = 200 is 3 Triton blocks of 64 plus 8 columns
# when interpreting.
N, D, V, CHUNK = 29, 24, 200, 8
UPSTREAM = 0.7  # the backward must scale by the upstream gradient (the engine divides by micro-batches)


def inputs(dtype, *, ignore: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen).to(dtype)
    weight = (0.5 * torch.randn(V, D, generator=gen)).to(dtype)  # logits of a few units, as in training
    targets = torch.randint(0, V, (N,), generator=gen)
    if ignore:
        targets[::4] = -100
    return hidden, weight, targets


def reference(hidden, weight, targets, z_loss):
    """fp64 autograd of mean(lse - x[target]) + z_loss * mean(lse^2) over the non-ignored tokens, on the same
    (rounded) inputs."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = h @ w.t()
    valid = targets != -100
    lse = logits.logsumexp(-1)[valid]
    ce = (lse - logits[valid].gather(1, targets[valid, None]).squeeze(1)).mean()
    loss = ce + z_loss * lse.pow(2).mean()
    gh, gw = torch.autograd.grad(loss * UPSTREAM, (h, w))
    return loss.item(), ce.item(), gh, gw


def errors(impl, dtype, z_loss, ignore):
    hidden, weight, targets = inputs(dtype, ignore=ignore)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, ce = fused_linear_cross_entropy(h, w, targets, z_loss=z_loss, impl=impl, chunk_size=CHUNK)
    assert loss.requires_grad and not ce.requires_grad
    (loss * UPSTREAM).backward()
    assert h.grad.dtype == w.grad.dtype == dtype
    ref_loss, ref_ce, ref_gh, ref_gw = reference(hidden, weight, targets, z_loss)
    return {"loss": abs(loss.item() - ref_loss) / abs(ref_loss), "ce": abs(ce.item() - ref_ce) / abs(ref_ce),
            # gradient errors relative to the largest reference entry (bf16 rounds relative to magnitude)
            "grad_hidden": ((h.grad.double() - ref_gh).abs().max() / ref_gh.abs().max()).item(),
            "grad_weight": ((w.grad.double() - ref_gw).abs().max() / ref_gw.abs().max()).item()}


@pytest.mark.parametrize("z_loss,ignore", [(0.0, False), (0.1, True)], ids=["plain", "z_loss+ignore_index"])
@pytest.mark.parametrize("dtype,tol", TOLERANCES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", ["unfused", *IMPLS])
def test_loss_and_gradients_match_fp64_reference(impl, dtype, tol, z_loss, ignore):
    errs = errors(impl, dtype, z_loss, ignore)
    assert max(errs.values()) <= tol, errs


def test_fp32_gradient_errors_are_also_small_in_absolute_terms():
    hidden, weight, targets = inputs(torch.float32, ignore=True)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = fused_linear_cross_entropy(h, w, targets, z_loss=0.1, impl="chunked", chunk_size=CHUNK)
    (loss * UPSTREAM).backward()
    _, _, ref_gh, ref_gw = reference(hidden, weight, targets, 0.1)
    assert (h.grad.double() - ref_gh).abs().max() <= 1e-4
    assert (w.grad.double() - ref_gw).abs().max() <= 1e-4


def test_lm_loss_and_the_unfused_impl_are_one_loss_that_leaves_ignored_tokens_out_of_the_z_loss_too():
    # Every fourth target is ignored: cross-entropy and z-loss are both means over the others only, as in
    # the fp64 reference (an unmasked z-loss over all 29 tokens differs by ~1e-3 here).
    hidden, weight, targets = inputs(torch.float32, ignore=True)
    for z_loss in (0.0, 0.1):
        fused = fused_linear_cross_entropy(hidden, weight, targets, z_loss=z_loss, impl="unfused")
        plain = lm_loss((hidden @ weight.t())[None], targets[None], z_loss)
        assert [t.item() for t in fused] == [t.item() for t in plain]
        ref_loss, ref_ce, _, _ = reference(hidden, weight, targets, z_loss)
        assert [t.item() for t in plain] == pytest.approx([ref_loss, ref_ce], rel=1e-6)


def test_leading_dims_autocast_and_no_grad():
    hidden, weight, targets = inputs(torch.float32, ignore=False)
    h_BTD = hidden[:28].view(4, 7, D).clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, ce = fused_linear_cross_entropy(h_BTD, w, targets[:28].view(4, 7), impl="chunked", chunk_size=CHUNK)
    loss.backward()
    # Autocast runs the head in bf16, as it would the output Linear; gradients come back in the leaves' dtype.
    assert h_BTD.grad.shape == h_BTD.shape and h_BTD.grad.dtype == w.grad.dtype == torch.float32
    ref_loss, _, _, _ = reference(hidden[:28].bfloat16(), weight.bfloat16(), targets[:28], 0.0)
    assert loss.item() == pytest.approx(ref_loss, rel=2e-2)
    with torch.no_grad():  # eval: the loss only, no gradients computed
        eval_loss, eval_ce = fused_linear_cross_entropy(hidden, weight, targets, impl="chunked", chunk_size=CHUNK)
    grad_loss, _ = fused_linear_cross_entropy(hidden, weight.requires_grad_(), targets, impl="chunked")
    assert not eval_loss.requires_grad and eval_loss.item() == pytest.approx(grad_loss.item(), rel=1e-6)


def test_second_backward_is_refused():
    hidden, weight, targets = inputs(torch.float32, ignore=False)
    loss, _ = fused_linear_cross_entropy(hidden.requires_grad_(), weight, targets, impl="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        loss.backward()


def peak_allocated_bytes(fn) -> int:
    """Peak of live bytes allocated through PyTorch's CPU allocator while `fn` runs: every allocation and
    free, in order, as the profiler records them (profile_memory=True)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_chunked_never_allocates_the_full_logits():
    n, d, v, chunk = 1024, 16, 4096, 64
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    weight = (0.5 * torch.randn(v, d, generator=gen)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    logits_bytes = n * v * 4  # 16 MiB; a chunk's are 1 MiB
    losses = {}

    def step(impl):
        def run():
            loss, _ = fused_linear_cross_entropy(hidden, weight, targets, z_loss=1e-3, impl=impl, chunk_size=chunk)
            loss.backward()
            losses[impl] = loss.item()
        return run

    peaks = {impl: peak_allocated_bytes(step(impl)) for impl in ("unfused", "chunked")}
    assert losses["chunked"] == pytest.approx(losses["unfused"], rel=1e-5)
    # The measurement sees the logits when they exist (logits, log-softmax and their gradients) ...
    assert peaks["unfused"] >= 2 * logits_bytes, peaks
    # ... and the chunked step holds a chunk's worth plus the two gradients (grad_weight is 256 KiB).
    assert peaks["chunked"] < logits_bytes / 4, peaks


def test_impl_checks_name_the_problem_and_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="unknown cross-entropy impl 'fused'; choose one of auto, unfused"):
        check_cross_entropy_impl("fused", "cpu")
    with pytest.raises(ValueError, match="'liger' needs a CUDA device, got 'cpu'.*use impl 'chunked'"):
        check_cross_entropy_impl("liger", "cpu")
    if importlib.util.find_spec("liger_kernel") is None:
        with pytest.raises(ValueError, match="pip install liger-kernel==0.8.5"):
            check_cross_entropy_impl("liger", "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="'triton' needs a CUDA device, got 'cpu'; use impl 'chunked' or 'auto'"):
        check_cross_entropy_impl("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        fused_linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), torch.zeros(2, dtype=torch.long),
                                   impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # auto never picks the interpreter; on CUDA it picks the Triton kernel.
    assert resolve_cross_entropy_impl("auto", "cpu") == "chunked"
    assert resolve_cross_entropy_impl("auto", "cuda:0") == "triton"


def test_default_chunk_bounds_one_chunks_logits():
    assert default_chunk_size(16384, 128256) == 512  # Llama-3 vocabulary: 512 x 128256 x 4 B = 250.5 MiB
    assert default_chunk_size(100, 128256) == 100
    assert default_chunk_size(10**6, 256) == 2**18
    for v in (1000, 32000, 128256, 256000):
        c = default_chunk_size(10**7, v)
        assert c * v * 4 <= CHUNK_LOGITS_BYTES < 2 * c * v * 4 and c & (c - 1) == 0
