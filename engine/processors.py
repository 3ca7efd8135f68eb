"""Logits processors: per-request changes to a batch of logits before sampling.

vLLM's formulas, applied batched and in vLLM's order:

1. allowed_token_ids: every other id gets -inf (ids >= the vocabulary size are ignored).
2. min_tokens: while the row has fewer output tokens than min_tokens, its stop_token_ids and
   (unless ignore_eos) the model's EOS ids get -inf, so nothing ends the output early.
   bad_words: a sequence's last token gets -inf when the output ends with the rest of it
   (a one-token sequence: always).
3. logit_bias: each listed id's logit gains its bias.
4. repetition_penalty: each token id seen in the row's prompt or output has a positive logit
   divided by the penalty and a non-positive one multiplied by it (1: off).
5. frequency_penalty: each id's logit loses the penalty times its count in the output.
6. presence_penalty: each id in the output loses the penalty once.

They are deterministic and never touch a ``torch.Generator`` or the global RNG, so seeded
sampling stays reproducible. Rows that need none come out bit-identical (in float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gpupool.messages.params import SamplingParams


def apply_processors(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    eos_ids: Sequence[int],
) -> torch.Tensor:
    """Semantics: x = logits.float(); for each row r with params[r].needs_processors:
    if allowed_token_ids: x[r, ~isin(arange(V), allowed)] = -inf; if len(output_ids[r]) <
    min_tokens: x[r, stop_token_ids + eos_ids (unless ignore_eos)] = -inf; for each bad
    word sequence s whose s[:-1] ends output_ids[r]: x[r, s[-1]] = -inf;
    x[r, id] += bias for (id, bias) in logit_bias; seen = prompt_ids[r] + output_ids[r];
    x[r, seen] = where(x[r, seen] > 0, x[r, seen] / rp, x[r, seen] * rp);
    x[r] -= frequency_penalty * count(output_ids[r]) + presence_penalty * (count > 0).
    Returns logits itself when no row needs any.

    logits: [R, V] any float dtype and device; params, prompt_ids, output_ids: R each;
    eos_ids: the model's EOS ids. Returns float32 [R, V] on logits' device.
    """
    if not any(p.needs_processors for p in params):
        return logits
    x = logits.float()  # may alias logits: only out-of-place ops below
    x = _ban(x, params, output_ids, eos_ids)
    x = _add_bias(x, params)
    x = _repetition_penalty(x, params, prompt_ids, output_ids)
    return _count_penalties(x, params, output_ids)


def _ban(x, params, output_ids, eos_ids) -> torch.Tensor:
    """-inf outside allowed_token_ids, on stop ids and EOS before min_tokens, and on each bad
    word's last token after its prefix."""
    n_rows, vocab = x.shape
    banned_ids = {r: list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
                  for r, p in enumerate(params) if len(output_ids[r]) < p.min_tokens}
    for r, p in enumerate(params):
        for seq in p.bad_words_token_ids or ():
            prefix = list(seq[:-1])
            if not prefix or list(output_ids[r][-len(prefix):]) == prefix:
                banned_ids.setdefault(r, []).append(seq[-1])
    allowed = {r: p.allowed_token_ids for r, p in enumerate(params)
               if p.allowed_token_ids is not None}
    if not (banned_ids or allowed):
        return x
    banned = _id_mask(n_rows, vocab, x.device, banned_ids)
    if allowed:
        restricted = torch.zeros(n_rows, 1, dtype=torch.bool)
        restricted[list(allowed)] = True
        banned |= restricted.to(x.device) & ~_id_mask(n_rows, vocab, x.device, allowed)
    return x.masked_fill(banned, float("-inf"))


def _add_bias(x, params) -> torch.Tensor:
    n_rows, vocab = x.shape
    biased = {r: p.logit_bias for r, p in enumerate(params) if p.logit_bias is not None}
    if not biased:
        return x
    bias = torch.zeros(n_rows, vocab, dtype=torch.float32)
    for r, pairs in biased.items():
        ids = [t for t, _ in pairs if t < vocab]
        bias[r, ids] = torch.tensor([b for t, b in pairs if t < vocab])
    return x + bias.to(x.device)


def _repetition_penalty(x, params, prompt_ids, output_ids) -> torch.Tensor:
    n_rows, vocab = x.shape
    penalized = {r: list(prompt_ids[r]) + list(output_ids[r])
                 for r, p in enumerate(params) if p.repetition_penalty != 1.0}
    if not penalized:
        return x
    pen = torch.ones(n_rows, 1, dtype=torch.float32)
    for r in penalized:
        pen[r] = params[r].repetition_penalty
    pen = pen.to(x.device)
    seen = _id_mask(n_rows, vocab, x.device, penalized)
    return torch.where(seen, torch.where(x > 0, x / pen, x * pen), x)


def _count_penalties(x, params, output_ids) -> torch.Tensor:
    """Frequency and presence penalties from the output tokens' counts."""
    n_rows, vocab = x.shape
    counted = [r for r, p in enumerate(params)
               if p.frequency_penalty != 0 or p.presence_penalty != 0]
    if not counted:
        return x
    counts = torch.zeros(n_rows, vocab, dtype=torch.float32)
    freq = torch.zeros(n_rows, 1, dtype=torch.float32)
    pres = torch.zeros(n_rows, 1, dtype=torch.float32)
    for r in counted:
        ids = torch.tensor([t for t in output_ids[r] if t < vocab], dtype=torch.long)
        counts[r].index_add_(0, ids, torch.ones(len(ids)))
        freq[r], pres[r] = params[r].frequency_penalty, params[r].presence_penalty
    counts = counts.to(x.device)
    return x - freq.to(x.device) * counts - pres.to(x.device) * (counts > 0).float()


def _id_mask(
    n_rows: int, vocab: int, device: torch.device, ids: dict[int, Sequence[int]]
) -> torch.Tensor:
    """[n_rows, vocab] bool: True at (r, t) for each t in ids[r] with t < vocab."""
    mask = torch.zeros(n_rows, vocab, dtype=torch.bool, device=device)
    counts = torch.tensor([len(v) for v in ids.values()], dtype=torch.long)
    rows = torch.repeat_interleave(torch.tensor(list(ids), dtype=torch.long), counts)
    cols = torch.tensor([t for v in ids.values() for t in v], dtype=torch.long)
    keep = cols < vocab
    flat = (rows[keep] * vocab + cols[keep]).to(device)
    return mask.view(-1).scatter_(0, flat, True).view(n_rows, vocab)
