"""kernels.linear agrees with F.linear on every path (oneDNN on CPU, fallback)."""

import pytest
import torch
import torch.nn.functional as F

from gpupool.kernels import linear as lin


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("m", [1, 7, 64])  # 7 and 64 rows cross the oneDNN size threshold
def test_linear_matches_f_linear_on_flat_buffer_views(onednn, m):
    lin.use_onednn(None if onednn else False)
    try:
        g = torch.Generator().manual_seed(m)
        buf = torch.randn(40_000, generator=g)
        w = buf[123 : 123 + 256 * 96].view(256, 96)  # a view at an odd offset, like weights
        b = torch.randn(256, generator=g)
        x = torch.randn(m, 96, generator=g)
        want = F.linear(x.double(), w.double(), b.double()).float()
        torch.testing.assert_close(lin.linear(x, w, b), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lin.linear(x, w), want - b, rtol=1e-5, atol=1e-5)
    finally:
        lin.use_onednn(None)


def test_other_dtypes_fall_back_to_f_linear():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    assert torch.equal(lin.linear(x, w), F.linear(x, w))
