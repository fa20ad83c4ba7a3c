"""The LM head and its loss in one step: linear + cross-entropy without the full [N, V] logits.

Shape legend: N tokens (batch x sequence, flattened), D model dim, V vocabulary, C tokens in a chunk.

With a 128k vocabulary the logits dwarf everything else a step holds: 8k tokens x 128256 x 4 bytes is 4.2 GB
of fp32 logits, and the unfused loss keeps up to three tensors that size alive (log-softmax saved for the
backward, its gradient, the gradient of the logits). The chunked algorithm (Liger-Kernel's, Hsu et al.
2024) never holds more than one chunk of them: for each chunk of C tokens the forward computes the fp32
logits [C, V], the loss, and at once the gradient of the loss wrt those logits, which it turns straight
into the chunk's rows of grad_hidden (grad_logits @ W) and adds into grad_weight (grad_logits^T @ h);
then the chunk's logits are dropped. The backward has nothing left to do but scale the two saved gradients
by the upstream gradient. The price: both gradients are computed even for a forward whose backward never
runs (so eval, under no_grad, skips them), and `retain_graph` double backwards are refused.

Implementations (`impl`):
  unfused  logits = hidden @ W^T in fp32, then cross_entropy_from_logits (training/loss.py's lm_loss too).
  chunked  the chunked algorithm in PyTorch (per-chunk softmax and gradient in place in the logits buffer).
  triton   the same chunks, the softmax / loss / gradient of each chunk one Triton kernel over vocabulary
           blocks with an online logsumexp (kernels/triton_cross_entropy.py); runs under TRITON_INTERPRET=1.
  liger    Liger-Kernel's LigerFusedLinearCrossEntropyLoss (CUDA only; its kernels fail under the interpreter).
  auto     triton on CUDA, chunked elsewhere (never the interpreter: it is orders of magnitude slower).

Precision: logits and the loss are fp32 whatever the input dtype; grad_weight is accumulated over chunks
in fp32; both gradients are returned in the input dtype. With bf16 inputs, grad_logits is rounded to
bf16 for the two gradient matmuls (as Liger and autocast do); on CUDA the matmuls run on bf16 tensor cores
with fp32 outputs (`out_dtype`), elsewhere on fp32 copies (CPU has no `out_dtype` kernels).
Under autocast the inputs are cast to the autocast dtype first, as the output Linear would be.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .available import has_module, interpreting, is_dtensor

IMPLS = ("auto", "unfused", "chunked", "triton", "liger")
IGNORE_INDEX = -100
# One chunk's fp32 logits are kept within this budget. 256 MiB is 512 rows of a 128256 vocabulary: the
# loss then costs at most ~1.5x that (fp32 logits + a bf16 gradient buffer) on top of the weight gradient,
# whatever the batch, while each chunk's matmul [512, D] x [D, V] still has ~500 FLOPs per weight byte
# read, above an H100's bf16 ridge point (~300), so re-reading the weight for every chunk does not make
# the loss memory-bound. Liger instead sizes chunks so their logits match the size of the hidden states
# (C = N * D / V rows): that bounds memory relative to the input but gives tiny chunks at small N (32 rows
# for N=2048, D=1024), re-streaming the weight 64 times. Smaller chunks: less memory, more weight traffic.
CHUNK_LOGITS_BYTES = 256 * 2**20




def _device_type(device) -> str:
    return torch.device(device).type if not isinstance(device, torch.device) else device.type



def check_cross_entropy_impl(impl: str, device) -> None:
    """Raise ValueError, naming the problem and the fix, if `impl` cannot run on `device` (config time)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown cross-entropy impl {impl!r}; choose one of {', '.join(IMPLS)}")
    device_type = _device_type(device)
    if impl == "triton":
        if not has_module("triton"):
            raise ValueError("cross-entropy impl 'triton' needs the triton package: pip install triton==3.9.0, "
                             "or use impl 'chunked' (the same algorithm in PyTorch)")
        if device_type != "cuda" and not interpreting():
            raise ValueError(f"cross-entropy impl 'triton' needs a CUDA device, got {device_type!r}; use impl "
                             "'chunked' or 'auto' on CPU (TRITON_INTERPRET=1 runs it on CPU, slowly, for debugging)")
    elif impl == "liger":
        if device_type != "cuda":
            raise ValueError(f"cross-entropy impl 'liger' needs a CUDA device, got {device_type!r} (Liger-Kernel's "
                             "kernels fail under the Triton interpreter); use impl 'chunked' or 'auto' on CPU")
        if not has_module("liger_kernel"):
            raise ValueError("cross-entropy impl 'liger' needs the liger-kernel package: pip install "
                             "liger-kernel==0.8.5, or use impl 'triton' / 'auto'")


def resolve_cross_entropy_impl(impl: str, device) -> str:
    """The concrete implementation `impl` means on `device`."""
    check_cross_entropy_impl(impl, device)
    if impl != "auto":
        return impl
    return "triton" if _device_type(device) == "cuda" and has_module("triton") else "chunked"


def default_chunk_size(n_tokens: int, vocab_size: int) -> int:
    """Tokens per chunk: the largest power of two whose fp32 logits fit CHUNK_LOGITS_BYTES, at most N."""
    rows = max(1, CHUNK_LOGITS_BYTES // (4 * vocab_size))
    return max(1, min(n_tokens, 1 << (rows.bit_length() - 1)))


def fused_linear_cross_entropy(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, *,
                               z_loss: float = 0.0, impl: str = "auto", chunk_size: int | None = None,
                               ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss including the z-loss term, to backpropagate; mean cross-entropy, detached), over the tokens
    whose target is not `ignore_index` — lm_loss's contract for logits = hidden @ weight^T.

    hidden [..., D] and targets [...] may carry leading dims (they are flattened); weight is [V, D], the
    output layer's. z-loss adds z_loss * mean(logsumexp^2) (PaLM). `chunk_size`: tokens per chunk for
    chunked/triton (None: see CHUNK_LOGITS_BYTES); liger picks its own.
    """
    if is_dtensor(weight_VD) or is_dtensor(hidden_ND):
        raise ValueError("fused_linear_cross_entropy needs the whole output weight on this rank, got a DTensor "
                         "(a tensor-parallel output layer); use the unfused loss with loss_parallel there")
    D = hidden_ND.shape[-1]
    if weight_VD.dim() != 2 or weight_VD.shape[1] != D:
        raise ValueError(f"weight must be [V, D={D}], got {tuple(weight_VD.shape)}")
    hidden_ND = hidden_ND.reshape(-1, D)
    targets_N = targets_N.reshape(-1).long()
    if targets_N.shape[0] != hidden_ND.shape[0]:
        raise ValueError(f"{hidden_ND.shape[0]} hidden rows but {targets_N.shape[0]} targets")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    impl = resolve_cross_entropy_impl(impl, hidden_ND.device)

    device_type = hidden_ND.device.type
    if torch.is_autocast_enabled(device_type):
        # What autocast would do to the output Linear: run it in the autocast dtype. Inside, autocast is
        # off so the fp32 softmax and accumulations stay fp32.
        dtype = torch.get_autocast_dtype(device_type)
        hidden_ND, weight_VD = hidden_ND.to(dtype), weight_VD.to(dtype)
    if hidden_ND.dtype != weight_VD.dtype:
        raise ValueError(f"hidden ({hidden_ND.dtype}) and weight ({weight_VD.dtype}) must have one dtype")
    with torch.autocast(device_type, enabled=False):
        if impl == "unfused":
            return _unfused(hidden_ND, weight_VD, targets_N, z_loss, ignore_index)
        if impl == "liger":
            return _liger(hidden_ND, weight_VD, targets_N, z_loss, ignore_index)
        if impl == "triton":
            from .triton_cross_entropy import ce_rows_triton
            rows = ce_rows_triton
        else:
            rows = ce_rows_torch
        if chunk_size is None:
            chunk_size = default_chunk_size(hidden_ND.shape[0], weight_VD.shape[0])
        need_h = torch.is_grad_enabled() and hidden_ND.requires_grad
        need_w = torch.is_grad_enabled() and weight_VD.requires_grad
        return _ChunkedLinearCrossEntropy.apply(hidden_ND, weight_VD, targets_N.contiguous(), float(z_loss),
                                                int(ignore_index), int(chunk_size), rows, need_h, need_w)


def cross_entropy_from_logits(logits_NV: torch.Tensor, targets_N: torch.Tensor, z_loss: float = 0.0,
                              ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, cross-entropy to report) from full logits, in fp32: the unfused loss, and the
    reference every chunked path is held to. Both are means over the tokens whose target is not
    `ignore_index`, z-loss included (an ignored token has no prediction to keep in check)."""
    logits_NV = logits_NV.float()
    ce = F.cross_entropy(logits_NV, targets_N, ignore_index=ignore_index)
    if z_loss == 0.0:
        return ce, ce.detach()
    valid_N = targets_N != ignore_index
    log_z_N = torch.logsumexp(logits_NV, dim=-1)
    return ce + z_loss * log_z_N[valid_N].pow(2).mean(), ce.detach()


def _unfused(hidden_ND, weight_VD, targets_N, z_loss, ignore_index):
    return cross_entropy_from_logits(hidden_ND.float() @ weight_VD.float().t(), targets_N, z_loss, ignore_index)


def _liger(hidden_ND, weight_VD, targets_N, z_loss, ignore_index):
    # liger-kernel 0.8.5's API: return_z_loss=True returns an object with the total loss and the z-loss
    # term; accum_dtype=float32 accumulates grad_weight in fp32 as keel's chunked path does.
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, lse_square_scale=z_loss,
                                               return_z_loss=True, accum_dtype=torch.float32)
    out = loss_fn(weight_VD, hidden_ND, targets_N)
    loss, z = (out.loss, out.z_loss) if hasattr(out, "loss") else out
    return loss, (loss - z).detach()


def ce_rows_torch(logits_CV: torch.Tensor, targets_C: torch.Tensor, ce_C: torch.Tensor, lse_C: torch.Tensor,
                  inv_n: torch.Tensor, z_loss: float, ignore_index: int, grad_CV: torch.Tensor | None) -> None:
    """PyTorch version of triton_cross_entropy.ce_rows_triton (same contract). Works in place in the logits
    buffer (it is overwritten), so the chunk needs no second [C, V] fp32 tensor."""
    valid_C = targets_C != ignore_index
    safe_C1 = torch.where(valid_C, targets_C, 0).unsqueeze(1)
    x_target_C = logits_CV.gather(1, safe_C1).squeeze(1)
    m_C1 = logits_CV.amax(1, keepdim=True)
    p_CV = logits_CV.sub_(m_C1).exp_()  # unnormalised softmax, in place
    s_C1 = p_CV.sum(1, keepdim=True)
    lse = torch.where(valid_C, (m_C1 + s_C1.log()).squeeze(1), 0.0)
    lse_C.copy_(lse)
    ce_C.copy_(torch.where(valid_C, lse - x_target_C, 0.0))
    if grad_CV is None:
        return
    # d(ce + z lse^2)/d logits = softmax * (1 + 2 z lse) - onehot; / n for the batch mean; 0 if ignored.
    scale_C = torch.where(valid_C, (1.0 + 2.0 * z_loss * lse) * inv_n, 0.0)
    p_CV.mul_(scale_C.unsqueeze(1) / s_C1)
    p_CV.scatter_add_(1, safe_C1, torch.where(valid_C, -inv_n, 0.0).unsqueeze(1))
    if grad_CV.data_ptr() != p_CV.data_ptr():
        grad_CV.copy_(p_CV)


class _Matmuls:
    """The three products of a chunk with fp32 results from inputs of the model dtype.

    fp32 inputs: plain fp32 matmuls. bf16/fp16 on CUDA: tensor-core matmuls with fp32 accumulation and an
    fp32 result via `out_dtype` (torch >= 2.8; the path Liger uses for its fp32 grad_weight accumulator).
    bf16/fp16 elsewhere: the same products on fp32 copies (the weight is upcast once per call), because
    CPU has no `out_dtype` matmul. Numerically the two low-precision paths match: bf16 operands, fp32 sums.
    Not run here: the CUDA branch (no GPU was available).
    """

    def __init__(self, weight_VD: torch.Tensor):
        self.weight_VD = weight_VD
        self.fp32 = weight_VD.dtype == torch.float32
        self.cuda_low = not self.fp32 and weight_VD.is_cuda
        self.weight32_VD = weight_VD if self.fp32 or self.cuda_low else weight_VD.float()

    def logits(self, h_CD, out_CV):
        if self.cuda_low:
            torch.mm(h_CD, self.weight_VD.t(), out_dtype=torch.float32, out=out_CV)
        else:
            torch.mm(h_CD if self.fp32 else h_CD.float(), self.weight32_VD.t(), out=out_CV)

    def grad_hidden(self, g_CV, out_CD):
        if self.fp32 or self.cuda_low:
            torch.mm(g_CV, self.weight_VD, out=out_CD)
        else:
            out_CD.copy_(g_CV.float() @ self.weight32_VD)

    def add_grad_weight(self, acc_VD, g_CV, h_CD):
        if self.fp32:
            acc_VD.addmm_(g_CV.t(), h_CD)
        elif self.cuda_low:
            torch.addmm(acc_VD, g_CV.t(), h_CD, out_dtype=torch.float32, out=acc_VD)
        else:
            acc_VD.addmm_(g_CV.t().float(), h_CD.float())


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, z_loss, ignore_index, chunk_size, rows, need_h, need_w):
        N, D = hidden_ND.shape
        V = weight_VD.shape[0]
        device = hidden_ND.device
        mm = _Matmuls(weight_VD)
        # A device tensor, so nothing waits for the host. No valid token: 1/0 = inf and the loss is nan,
        # as F.cross_entropy's mean over nothing is.
        inv_n = 1.0 / (targets_N != ignore_index).sum().to(torch.float32).reshape(1)
        need_grad = need_h or need_w
        grad_h_ND = torch.empty(N, D, dtype=hidden_ND.dtype, device=device) if need_h else None
        grad_w_VD = torch.zeros(V, D, dtype=torch.float32, device=device) if need_w else None
        ce_N = torch.empty(N, dtype=torch.float32, device=device)
        lse_N = torch.empty(N, dtype=torch.float32, device=device)

        C = max(1, min(chunk_size, N))
        logits_buf = torch.empty(C, V, dtype=torch.float32, device=device)
        # fp32: the gradient overwrites the logits in place. bf16: it goes to a bf16 buffer, the operand
        # the two gradient matmuls take.
        grad_buf = None
        if need_grad:
            grad_buf = logits_buf if mm.fp32 else torch.empty(C, V, dtype=hidden_ND.dtype, device=device)
        for start in range(0, N, C):
            stop = min(start + C, N)
            h_CD = hidden_ND[start:stop]
            logits_CV = logits_buf[:stop - start]
            mm.logits(h_CD, logits_CV)
            g_CV = grad_buf[:stop - start] if need_grad else None
            rows(logits_CV, targets_N[start:stop], ce_N[start:stop], lse_N[start:stop], inv_n, z_loss,
                 ignore_index, g_CV)
            if need_h:
                mm.grad_hidden(g_CV, grad_h_ND[start:stop])
            if need_w:
                mm.add_grad_weight(grad_w_VD, g_CV, h_CD)
        del logits_buf, grad_buf

        ce = ce_N.sum() * inv_n[0]
        loss = ce + z_loss * lse_N.square().sum() * inv_n[0] if z_loss else ce.clone()
        if need_w and grad_w_VD.dtype != weight_VD.dtype:
            grad_w_VD = grad_w_VD.to(weight_VD.dtype)
        ctx.grads = (grad_h_ND, grad_w_VD)
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        if ctx.grads is None:
            raise RuntimeError("the fused cross-entropy computes its gradients in the forward and hands them over "
                               "once; a second backward (retain_graph=True) is not supported")
        grad_h_ND, grad_w_VD = ctx.grads
        ctx.grads = None
        # In place: these tensors belong to this graph alone and are released as they are returned.
        for g in (grad_h_ND, grad_w_VD):
            if g is not None:
                g.mul_(grad_loss.to(g.dtype))
        return grad_h_ND, grad_w_VD, None, None, None, None, None, None, None
