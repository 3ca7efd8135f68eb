"""The batched sampler (engine/sampler.py): each row drawn alone whatever shares its batch,
from the distribution filtered_probs states, through its candidates or its whole vocabulary."""

import pytest
import torch

from gpupool.engine import sampler
from gpupool.engine.sampler import filtered_probs, sample
from gpupool.messages.params import SamplingParams

KINDS = [  # (params without seed) covering every path
    dict(temperature=1.0),
    dict(temperature=0.7, min_p=0.05),
    dict(temperature=1.0, top_k=5),
    dict(temperature=1.2, top_p=0.9),
    dict(temperature=0.9, top_k=40, top_p=0.8),
    dict(temperature=1.0, top_k=2000),  # more candidates than any round of CANDIDATES
    dict(temperature=0.0),  # greedy beside them
]


def _logits(rows, vocab, seed, flat=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * (0.05 if flat else 3.0)
    return x


def test_a_rows_token_does_not_depend_on_its_batch():
    """Each row alone, then in batches of other rows (every kind, shuffled, repeated): the
    same token, for many seeds and output indices."""
    vocab = 3000
    logits = _logits(40, vocab, 1)
    flat = [r for r in range(40) if r % len(KINDS) == 3]  # top-p rows: all their vocabulary
    logits[flat] = _logits(len(flat), vocab, 2, flat=True)
    g = torch.Generator().manual_seed(3)
    params = [SamplingParams(seed=int(torch.randint(0, 2**62, (1,), generator=g)),
                             **KINDS[r % len(KINDS)]) for r in range(40)]
    indices = [int(i) for i in torch.randint(0, 500, (40,), generator=g)]
    alone = [sample(logits[r : r + 1], [params[r]], [indices[r]])[0] for r in range(40)]
    for trial in range(4):
        order = torch.randperm(40, generator=g)[: 5 + 10 * trial].tolist()
        got = sample(logits[order], [params[r] for r in order], [indices[r] for r in order])
        assert got == [alone[r] for r in order], trial


@pytest.mark.parametrize("kind", range(len(KINDS) - 1))
@pytest.mark.parametrize("flat", [False, True])
def test_draws_follow_the_filtered_distribution(kind, flat, monkeypatch):
    """4,000 draws of one row (4,000 seeds): never a token outside filtered_probs' support,
    and frequencies within 0.05 of it in total variation over its 30 likeliest tokens plus
    the rest. Flat logits make a top-p row's candidates fall short round after round (all of
    its vocabulary in the end; CANDIDATES lowered to 8 then 64 so each round runs)."""
    if flat:
        monkeypatch.setattr(sampler, "CANDIDATES", (8, 64))
    vocab = 600
    row = _logits(1, vocab, 10 + kind, flat=flat)[0]
    n = 4000
    params = [SamplingParams(seed=s, **KINDS[kind]) for s in range(n)]
    got = torch.tensor(sample(row.expand(n, vocab), params, [7] * n))
    want = filtered_probs(row, params[0]).double()
    assert bool((want[got] > 0).all())  # never outside the support
    freq = torch.bincount(got, minlength=vocab).double() / n
    top = torch.argsort(want, descending=True)[:30]
    rest = torch.ones(vocab, dtype=torch.bool)
    rest[top] = False
    tv = 0.5 * ((freq[top] - want[top]).abs().sum() + (freq[rest].sum() - want[rest].sum()).abs())
    assert tv < 0.05, tv


def test_the_draw_is_keyed_by_seed_and_index():
    """The same seed and output index give the same token; another index or seed moves
    it (over 200 pairs on a flat row, a fixed key would give one token)."""
    row = _logits(1, 500, 4, flat=True)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    first = sample(row, [p], [3])
    assert sample(row, [p], [3]) == first
    by_index = {sample(row, [p], [i])[0] for i in range(100)}
    by_seed = {sample(row, [SamplingParams(temperature=1.0, top_p=0.95, seed=s)], [3])[0]
               for s in range(100)}
    assert len(by_index) > 20 and len(by_seed) > 20
