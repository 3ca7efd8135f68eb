"""kernels.linear agrees with F.linear on every path (oneDNN on CPU, fallback)."""

import pytest
import torch
import torch.nn.functional as F

from gpupool.kernels import linear as lin

TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("m", [1, 7, 64])  # 7 and 64 rows cross the oneDNN size threshold
def test_linear_matches_f_linear_on_flat_buffer_views(onednn, m, dtype):
    """oneDNN where it works for the dtype on this CPU (bf16 needs avx512 or AMX), else the
    F.linear fallback: either way the same values as a float64 product."""
    lin.use_onednn(None if onednn else False)
    try:
        g = torch.Generator().manual_seed(m)
        buf = torch.randn(40_000, generator=g).to(dtype)
        w = buf[123 : 123 + 256 * 96].view(256, 96)  # a view at an odd offset, like weights
        b = torch.randn(256, generator=g).to(dtype)
        x = torch.randn(m, 96, generator=g).to(dtype)
        want = F.linear(x.double(), w.double(), b.double())
        tol = TOL[dtype]
        got = lin.linear(x, w, b)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 10)
        torch.testing.assert_close(lin.linear(x, w).double(), want - b.double(), rtol=tol,
                                   atol=tol * 10)
    finally:
        lin.use_onednn(None)


def test_other_dtypes_fall_back_to_f_linear():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(lin.linear(x, w), F.linear(x, w))
