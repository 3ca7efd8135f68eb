"""Turn a batch of logits into next tokens.

Greedy rows take the argmax together. Sampled rows are drawn together, by batched tensor ops
on the logits' device (temperature, min-p, top-k, top-p; then one draw a row), and only the
chosen ids cross to the host. Each draw is an inverse-CDF lookup of one uniform number keyed by
the request's seed and the token's index in its output (``token_seed``, a counter-based hash):
so a seeded request samples the same tokens whatever else shares its batch (every op works on
each row alone), and a request resumed from the tokens it already delivered (on this engine or
another) samples exactly what the uninterrupted one would have.

Top-k and top-p rows are cut from their most likely tokens (``torch.topk``, sorted) instead of
a sort of the whole vocabulary: a top-p row takes CANDIDATES[0] of them, more (the next count,
then all of its vocabulary) while those hold no more than its top_p. ``filtered_probs`` is the
one-row statement of the same distribution (tests hold the batched draw to it), except
where tokens tie at the k-th probability: it keeps them all, the batched draw the first k
(equal probabilities in token id order). Batch invariance is tested on CPU; on CUDA the ops
are per row too, unverified on a GPU yet.
"""

from __future__ import annotations

import functools

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


CANDIDATES = (128, 512, 2048)  # a top-p row's candidate tokens, round by round (then all)


def uniform(seed: int, index: int) -> float:
    """The uniform number in [0, 1) that draws output token ``index`` of a request seeded
    ``seed`` (53 bits of ``token_seed``: exact in float64 on every device)."""
    return (token_seed(seed, index) >> 11) * 2.0**-53


def _column(values, dtype=torch.float32, *, device) -> torch.Tensor:
    """One value a row, [R, 1]."""
    return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of ``probs`` [R, N] (non-negative, not all zero), the first index whose
    cumulative sum (float64, in index order) passes ``u`` [R] times the row's total."""
    cdf = torch.cumsum(probs.double(), dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)


def _draw_cut(probs, ps, ks, u, chosen, where) -> None:
    """The top-k / top-p rows ``where`` of ``probs`` (their params ``ps``, top_k ``ks``,
    uniforms ``u``) drawn into ``chosen[where]``: from their candidates first (top_k of
    them, or CANDIDATES[0]), more for a top-p row whose candidates hold no more than its
    top_p, then all of its vocabulary. Rows are grouped by their own candidate count, so no
    row's ops depend on what shares its batch."""
    dev, vocab = probs.device, probs.shape[1]

    col = functools.partial(_column, device=dev)

    rounds = [c for c in CANDIDATES if c < vocab] + [vocab]
    need = {j: ks[j] if ks[j] < vocab else rounds[0] for j in range(len(ps))}
    while need:
        k = min(need.values())
        cut = [j for j, n in need.items() if n == k]
        for j in cut:
            del need[j]
        rows = [where[j] for j in cut]
        mine = probs if len(rows) == probs.shape[0] else probs[rows]
        vals, ids = torch.topk(mine, k, dim=-1)  # sorted, most likely first
        if dev.type != "cpu":  # equal probabilities in token id order: CUDA's topk picks
            by_id = torch.argsort(ids, dim=-1, stable=True)  # an algorithm by the rows
            vals, ids = vals.gather(1, by_id), ids.gather(1, by_id)  # (CPU's works on a row
            vals, order = torch.sort(vals, dim=-1, descending=True, stable=True)  # alone)
            ids = ids.gather(1, order)
        # renormalised within the top k (as a softmax after masking the rest; the total is
        # the sequential cumulative sum's, not a reduction of the row's own choosing); a row
        # without top_k keeps the whole vocabulary's normalisation
        limited = col([ks[j] < vocab for j in cut], torch.bool)
        vals = torch.where(limited, vals / torch.cumsum(vals, dim=-1)[:, -1:], vals)
        top_p = col([ps[j].top_p for j in cut])
        cum = torch.cumsum(vals, dim=-1)
        kept = vals.masked_fill(cum - vals > top_p, 0.0)  # the smallest prefix reaching top_p
        done = list(range(len(cut)))
        if k < vocab:  # a top-p row whose candidates fall short: more of them next round
            short = (~limited.squeeze(1) & (cum[:, -1] <= top_p.squeeze(1))).tolist()
            more = next((c for c in rounds if c > k), vocab)
            need.update({cut[i]: more for i, s in enumerate(short) if s})
            done = [i for i, s in enumerate(short) if not s]
        if done:
            pick = _draw(kept[done], u[[cut[i] for i in done]])
            chosen[[rows[i] for i in done]] = ids[done].gather(1, pick.unsqueeze(1)).squeeze(1)


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
    """logits: [R, V] without NaN (the engine fails such rows first); one params (with a
    seed) and output index per row. Returns R ids."""
    rows = [r for r, p in enumerate(params) if not p.is_greedy]
    if len(rows) < len(params):
        out = greedy(logits)
    else:
        out = [0] * len(params)
    if not rows:
        return out
    dev = logits.device
    ps = [params[r] for r in rows]
    vocab = logits.shape[1]

    col = functools.partial(_column, device=dev)

    x = (logits if len(rows) == len(params) else logits[rows]).float()
    if any(p.temperature != 1.0 for p in ps):
        x = x / col([p.temperature for p in ps])
    if any(p.min_p > 0.0 for p in ps):  # vLLM v1: drop tokens below min_p times the top one
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < col([p.min_p for p in ps]) * probs.amax(-1, keepdim=True),
                          float("-inf"))
    probs = torch.softmax(x, dim=-1)
    u = torch.tensor([uniform(p.seed, indices[r]) for p, r in zip(ps, rows)],
                     dtype=torch.float64, device=dev)
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in ps]
    chosen = torch.empty(len(rows), dtype=torch.long, device=dev)
    whole = [j for j, p in enumerate(ps) if ks[j] == vocab and p.top_p >= 1.0]
    if whole:  # temperature (and min-p) only: the whole vocabulary in index order
        chosen[whole] = _draw(probs[whole], u[whole])
    cut = [j for j in range(len(ps)) if j not in set(whole)]
    if cut:
        _draw_cut(probs, [ps[j] for j in cut], [ks[j] for j in cut], u[cut], chosen, cut)
    for r, token in zip(rows, chosen.tolist()):
        out[r] = token
    return out


def logprobs(logits: torch.Tensor, token_ids: list[int], nums: list[int | None],
             ranks: bool = False) -> list:
    """Per row with ``nums[r]`` set: (logprob of token_ids[r], ((id, logprob), ...) of the
    nums[r] most likely tokens), and with ``ranks`` the token's rank (1 + the tokens more
    likely than it); None for other rows. From the raw model distribution."""
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
    if ranks:
        picked = lp[torch.arange(len(rows)), [token_ids[r] for r in rows]]
        above = (lp > picked.unsqueeze(1)).sum(-1).tolist()
        for j, r in enumerate(rows):
            out[r] = (*out[r], above[j] + 1)
    return out
