"""The CUDA C++ kernels (kernels/csrc) on the GPU: attention forward and RMSNorm forward and backward, against
the same fp64 references and poisoned outputs as the Triton kernels. In a file of their own, run last by
the GPU check: the extension's first use builds it with nvcc (about a minute), which must not delay the rest.
"""
import pytest
import torch

from keel.kernels.attention import CUDA_HEAD_DIMS
from test_kernels_gpu import (ATTENTION, ATTENTION_TOL, DTYPES, attention_name, check, check_rms_norm, doc_ids,
                              randn, reference_attention)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="session")
def cuda_ops(device):
    if device != "cuda":
        pytest.skip("the CUDA extension needs a CUDA device")
    from keel.kernels.cuda_build import cuda_ops_buildable
    ok, why = cuda_ops_buildable()
    if not ok:
        pytest.skip(f"CUDA extension not buildable here: {why}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", range(4))
def test_cuda_attention_forward(device, poison, case, dtype, cuda_ops):
    name = attention_name("cuda", ATTENTION[device][case])
    _, B, H, K, T, d, causal, lengths = ATTENTION[device][case]
    if d not in CUDA_HEAD_DIMS:
        pytest.skip(f"the CUDA kernel is built for head dims {CUDA_HEAD_DIMS}")
    from keel.kernels.cuda_ops import cuda_attention_fwd
    gen = torch.Generator().manual_seed(200 + case)
    q, k, v = (randn(gen, (B, h, T, d), device, dtype) for h in (H, K, K))
    ids = doc_ids(lengths, T, device) if lengths else None
    with poison(), torch.no_grad():
        out = cuda_attention_fwd(q, k, v, causal=causal, doc_ids_BT=ids)
    check(name, "out", out, reference_attention(q, k, v, causal, ids), dtype, ATTENTION_TOL)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_rms_norm_forward_and_backward(device, poison, dtype, cuda_ops):
    from keel.kernels.cuda_ops import cuda_rms_norm
    check_rms_norm(cuda_rms_norm, "cuda", device, poison, dtype)
