"""KV page pool: all-or-nothing allocation, integrity, per-model page views."""

import pytest
import torch

from gpupool.pool.kv import KVStorage, PagePool


def test_allocate_free_and_integrity():
    pool = PagePool(5)
    a = pool.allocate(3)
    assert sorted(a) == [0, 1, 2] and pool.num_free_pages == 2
    assert pool.allocate(3) is None and pool.num_free_pages == 2  # nothing taken
    pool.free(a[:1])
    pool.check_integrity()
    with pytest.raises(ValueError):
        pool.free(a[:1])  # double free
    assert pool.num_used_pages == 2
    pool.free(a[1:])
    pool.check_integrity()
    assert pool.num_free_pages == 5


def test_integrity_catches_a_lost_page():
    pool = PagePool(3)
    pool.allocate(1)
    pool._refs.clear()  # simulate a leak
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_models_view_the_same_pages_with_their_own_geometry():
    kv = KVStorage(num_pages=4, page_bytes=4096)
    a = kv.model_view(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32)
    b = kv.model_view(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float16)
    assert a.shape == (4, 2, 2, 8, 2, 16)  # 512 B per token -> 8 tokens a page
    assert b.shape == (4, 1, 2, 128, 1, 8)  # 32 B per token -> 128 tokens a page
    a[2].fill_(1.0)  # writing page 2 through one view shows through the other
    assert b[2].abs().sum() > 0 and b[1].abs().sum() == 0
    assert a.data_ptr() == b.data_ptr() == kv.storage.data_ptr()


def test_a_page_too_small_for_one_token_is_an_error():
    kv = KVStorage(num_pages=2, page_bytes=64)
    with pytest.raises(ValueError, match="holds no token"):
        kv.model_view(num_layers=4, num_kv_heads=2, head_dim=16, dtype=torch.float32)
