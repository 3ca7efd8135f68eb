"""SGMV shrink/expand: the torch reference against a dense float64 computation, and Triton
(interpreted on CPU, fp32 — the interpreter's bf16 dot is wrong) against the reference.
Parametrised in the manner of punica's tests: rank x hidden size x adapter popularity x odd
batch sizes x dtype."""

import pytest
import torch

from gpupool.kernels import reference, triton_available

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _segments(batch: int, num_slots: int, popularity: str, seed: int):
    """Row -> slot (-1: no adapter) for a popularity pattern, as sorted segments."""
    g = torch.Generator().manual_seed(seed)
    if popularity == "distinct":
        slots = torch.arange(batch) % num_slots
    elif popularity == "uniform":
        slots = torch.randint(0, num_slots, (batch,), generator=g)
    elif popularity == "skewed":  # Zipf-like: slot 0 most, and some base rows
        slots = torch.clamp(torch.empty(batch).exponential_(1.5, generator=g).long(), 0,
                            num_slots - 1)
        slots[torch.rand(batch, generator=g) < 0.2] = -1
    else:  # identical
        slots = torch.zeros(batch, dtype=torch.long)
    slots = slots.sort().values.tolist()
    starts, seg_slots = [0], []
    for i, s in enumerate(slots):
        if i == 0 or s != slots[i - 1]:
            if i:
                starts.append(i)
            seg_slots.append(s)
    starts.append(batch)
    keep = [k for k, s in enumerate(seg_slots) if s >= 0]  # base rows form no segment
    return ([starts[k] for k in keep] if keep else [], [seg_slots[k] for k in keep],
            [(starts[k], starts[k + 1]) for k in keep], slots)


def _case(batch, hidden, rank, popularity, dtype, seed=0):
    num_slots, max_rank = 5, 64
    g = torch.Generator().manual_seed(seed)
    _, seg_slots, bounds, row_slots = _segments(batch, num_slots, popularity, seed)
    # segments must be given as contiguous [lo, hi) runs; express via starts + row ranges
    ranks = [max(1, rank - 2 * (s % 3)) for s in seg_slots]  # different ranks in one batch
    x = torch.randn(batch, hidden, generator=g).to(dtype)
    a = (torch.randn(num_slots, max_rank, hidden, generator=g) * 0.1).to(dtype)
    b = (torch.randn(num_slots, hidden + 3, max_rank, generator=g) * 0.1).to(dtype)
    return x, a, b, seg_slots, bounds, ranks, row_slots


def _meta(bounds, seg_slots, ranks):
    # Rows between segments (base rows) are skipped: express each segment as its own
    # [lo, hi) by giving starts that jump; we use per-segment starts from bounds.
    starts = torch.tensor([lo for lo, _ in bounds] + ([bounds[-1][1]] if bounds else [0]),
                          dtype=torch.int32)
    return (starts, torch.tensor(seg_slots, dtype=torch.int32),
            torch.tensor(ranks, dtype=torch.int32))


def _dense(x, a, b, bounds, seg_slots, ranks):
    h = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float64)
    y = torch.zeros(x.shape[0], b.shape[1], dtype=torch.float64)
    for (lo, hi), s, r in zip(bounds, seg_slots, ranks):
        h[lo:hi, :r] = x[lo:hi].double() @ a[s, :r].double().T
        y[lo:hi] = h[lo:hi, :r] @ b[s, :, :r].double().T
    return h, y


PARAMS = pytest.mark.parametrize("popularity", ["distinct", "uniform", "skewed", "identical"])


@PARAMS
@pytest.mark.parametrize("batch", [1, 7, 33])
@pytest.mark.parametrize("hidden,rank", [(64, 4), (96, 16), (160, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_dense(popularity, batch, hidden, rank, dtype):
    x, a, b, seg_slots, bounds, ranks, _ = _case(batch, hidden, rank, popularity, dtype)
    starts, slots, r = _meta(bounds, seg_slots, ranks)
    want_h, want_y = _dense(x, a, b, bounds, seg_slots, ranks)
    h = reference.sgmv_shrink(x, a, starts, slots, r)
    tol = TOL[dtype] * max(1.0, want_h.abs().max().item())
    torch.testing.assert_close(h.double(), want_h, atol=tol, rtol=TOL[dtype])
    y = torch.zeros(batch, b.shape[1], dtype=dtype)
    reference.sgmv_expand(y, h, b, starts, slots, r, torch.zeros_like(r))
    tol = TOL[dtype] * max(1.0, want_y.abs().max().item())
    torch.testing.assert_close(y.double(), want_y, atol=tol, rtol=TOL[dtype])


def test_rows_without_adapter_are_untouched_and_offsets_select_columns():
    x = torch.randn(6, 8)
    a = torch.randn(2, 4, 8)
    b = torch.randn(2, 5, 2)
    starts = torch.tensor([1, 3, 5], dtype=torch.int32)  # rows 0 and 5 belong to no segment
    slots = torch.tensor([1, 0], dtype=torch.int32)
    h = reference.sgmv_shrink(x, a, starts, slots, torch.tensor([4, 2], dtype=torch.int32))
    assert h[0].abs().sum() == 0 and h[5].abs().sum() == 0 and h[3:5, 2:].abs().sum() == 0
    y = torch.ones(6, 5)
    reference.sgmv_expand(y, h, b, starts, slots, torch.tensor([2, 2], dtype=torch.int32),
                          torch.tensor([2, 0], dtype=torch.int32))
    assert torch.equal(y[0], torch.ones(5)) and torch.equal(y[5], torch.ones(5))
    torch.testing.assert_close(y[1:3], 1 + h[1:3, 2:4] @ b[1].T)


needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@needs_triton
@PARAMS
@pytest.mark.parametrize("batch", [1, 19])
@pytest.mark.parametrize("hidden,rank", [(64, 8), (96, 64)])
def test_triton_matches_reference(popularity, batch, hidden, rank):
    from gpupool.kernels import sgmv

    x, a, b, seg_slots, bounds, ranks, _ = _case(batch, hidden, rank, popularity,
                                                  torch.float32, seed=1)
    starts, slots, r = _meta(bounds, seg_slots, ranks)
    offs = torch.zeros_like(r)
    want_h = reference.sgmv_shrink(x, a, starts, slots, r)
    got_h = sgmv.sgmv_shrink(x, a, starts, slots, r)
    torch.testing.assert_close(got_h, want_h, atol=1e-4, rtol=1e-4)
    want_y = torch.randn(batch, b.shape[1])
    got_y = want_y.clone()
    reference.sgmv_expand(want_y, want_h, b, starts, slots, r, offs)
    sgmv.sgmv_expand(got_y, want_h, b, starts, slots, r, offs)
    torch.testing.assert_close(got_y, want_y, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_on_gpu(dtype):
    from gpupool.kernels import sgmv

    x, a, b, seg_slots, bounds, ranks, _ = _case(64, 256, 16, "skewed", dtype, seed=2)
    starts, slots, r = (t.cuda() for t in _meta(bounds, seg_slots, ranks))
    x, a, b = x.cuda(), a.cuda(), b.cuda()
    h = sgmv.sgmv_shrink(x, a, starts, slots, r)
    want_h, want_y = _dense(x.cpu(), a.cpu(), b.cpu(), bounds, seg_slots, ranks)
    torch.testing.assert_close(h.double().cpu(), want_h, atol=0.1, rtol=TOL[dtype])


@needs_triton
@pytest.mark.parametrize("page_bytes", [4096, 1 << 16])
def test_triton_reads_the_adapters_pages_in_place(page_bytes):
    """Triton's LoRA kernels on the pages (kernels.sgmv.lora_paged: each adapter's pieces
    found through its page table, pages scattered and out of order) against the segmented
    torch path on the same adapters gathered out of their pages: unequal segments, base rows
    between adapters, ranks 3 to 16, adapters targeting every projection or a few, segments
    longer than a 16-row tile (interpreted on CPU, fp32)."""
    from gpupool.adapters.base import GROUPS
    from gpupool.adapters.batch import LoraBatch
    from gpupool.kernels.backend import TritonOps
    from tests.factories import lora_pages

    widths = {"hidden": 40, "q": 40, "kv": 8, "inter": 72}
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    specs = {"a": (3, every), "b": (16, ("q_proj", "v_proj", "down_proj")),
             "c": (8, ("k_proj", "up_proj"))}
    paged, tables = lora_pages(widths, specs, torch.Generator().manual_seed(3),
                               page_bytes=page_bytes)
    targets = {n: t for n, (_, t) in specs.items()}
    g = torch.Generator().manual_seed(4)
    for rows in (["a", "a", "b", "b", "b", "c"], ["c"], [None, "a", None, "c", "c"],
                 ["b"] * 19 + [None] + ["a"] * 3):
        fast = LoraBatch.build(rows, tables, paged, targets, "cpu", TritonOps())
        slow = LoraBatch.build(rows, tables, paged, targets, "cpu")
        assert fast.paged is not None and slow.paged is None
        for group, (fan_in, projs) in GROUPS.items():
            x = torch.randn(len(rows), widths[fan_in], generator=g)
            base = torch.randn(len(rows), sum(widths[f] for _, f in projs), generator=g)
            got, want = base.clone(), base.clone()
            fast.apply(0, group, x, got)
            slow.apply(0, group, x, want)
            for r, name in enumerate(rows):
                if name is None:  # base rows untouched
                    assert torch.equal(got[r], base[r])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
