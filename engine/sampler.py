"""Turn a batch of logits into next tokens.

Greedy rows take the argmax together. Sampled rows draw with counter-based randomness: token
*i* of a request comes from a generator seeded with ``token_seed(seed, i)``, a hash of the
request's seed and the token's index in its output. So a seeded request samples the same
tokens whatever else shares its batch, and a request resumed from the tokens it already
delivered (on this engine or another) samples exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import torch

from gpupool.kernels import native
from gpupool.messages.params import SamplingParams

_MASK = (1 << 64) - 1


def token_seed(seed: int, index: int) -> int:
    """The 64-bit seed of output token ``index`` of a request seeded ``seed``: SplitMix64 of
    the pair, so nearby seeds and indices give unrelated streams."""
    x = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [V] after temperature, min-p, top-k and top-p (float32, on CPU)."""
    logits = logits.float() / params.temperature
    if params.min_p > 0.0:  # vLLM v1: drop tokens below min_p times the top probability
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k != -1 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        drop = cum - sorted_probs > params.top_p  # keep the smallest prefix reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def greedy(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first index of its largest value) for logits [R, V] holding no
    NaN: the native kernel on CPU float32 rows (torch's argmax is a scalar loop there: 43 us
    a row of SmolLM2's 49152 logits against ~6), torch's elsewhere."""
    if native.takes_rows(logits):
        return native.argmax(logits)
    return logits.argmax(dim=-1).tolist()


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
    """logits: [R, V] without NaN (the engine fails such rows first); one params (with a
    seed) and output index per row. Returns R ids."""
    out = greedy(logits)
    cpu = None
    gen = None
    for r, p in enumerate(params):
        if p.is_greedy:
            continue
        if cpu is None:
            cpu = logits.float().cpu()
            gen = torch.Generator(device="cpu")
        gen.manual_seed(token_seed(p.seed, indices[r]))
        out[r] = int(torch.multinomial(filtered_probs(cpu[r], p), 1, generator=gen))
    return out


def logprobs(logits: torch.Tensor, token_ids: list[int], nums: list[int | None]) -> list:
    """Per row with ``nums[r]`` set: (logprob of token_ids[r], ((id, logprob), ...) of the
    nums[r] most likely tokens); None for other rows. From the raw model distribution."""
    rows = [r for r, n in enumerate(nums) if n is not None]
    out: list = [None] * len(nums)
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), dim=-1).cpu()
    k = max(nums[r] for r in rows)
    top_v, top_i = torch.topk(lp, k, dim=-1) if k else (None, None)
    for j, r in enumerate(rows):
        top = ()
        if nums[r]:
            top = tuple(zip(top_i[j, : nums[r]].tolist(), top_v[j, : nums[r]].tolist()))
        out[r] = (float(lp[j, token_ids[r]]), top)
    return out
