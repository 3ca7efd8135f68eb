"""Logits processors and min-p, against transformers' reference processors."""

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
)

from gpupool import SamplingParams
from gpupool.engine.processors import apply_processors
from gpupool.engine.sampler import filtered_probs

V = 64
EOS = (2,)
NEG = float("-inf")


def rand_logits(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 3


def one(logits, p, prompt, out, eos=EOS):
    return apply_processors(logits[None], [p], [prompt], [out], eos)[0]


@pytest.mark.parametrize("penalty", [0.8, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    logits = rand_logits(3, seed=1)
    prompts = [[5, 9, 9, 40, 63], [0, 1], [7]]
    outputs = [[5, 11, 12], [], [30, 7, 30, 8]]
    got = apply_processors(logits, [SamplingParams(repetition_penalty=penalty)] * 3,
                           prompts, outputs, EOS)
    ref = RepetitionPenaltyLogitsProcessor(penalty)
    for r in range(3):
        ids = torch.tensor([prompts[r] + outputs[r]])
        want = ref(ids, logits[r : r + 1].clone())[0]
        torch.testing.assert_close(got[r], want, rtol=0, atol=1e-6)
        untouched = torch.ones(V, dtype=torch.bool)
        untouched[ids[0]] = False
        assert torch.equal(got[r][untouched], logits[r][untouched])
        assert not torch.equal(got[r], logits[r])


@pytest.mark.parametrize("temperature", [0.7, 1.5])
@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_matches_transformers(temperature, min_p):
    logits = rand_logits(4, seed=2)
    warp = MinPLogitsWarper(min_p)
    for row in logits:
        got = filtered_probs(row, SamplingParams(temperature=temperature, min_p=min_p))
        scaled = (row / temperature)[None]
        want = torch.softmax(warp(None, scaled), dim=-1)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert (got == 0).any() and (got > 0).sum() >= 1


def test_min_p_one_keeps_only_the_top_tokens():
    row = torch.tensor([1.0, 3.0, -2.0, 3.0, 0.5])
    got = filtered_probs(row, SamplingParams(min_p=1.0))
    assert torch.equal(got, torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0]))


def test_min_p_zero_is_bit_identical_and_composes_with_top_k_top_p():
    logits = rand_logits(4, seed=3)
    for row in logits:
        for kw in ({}, {"top_k": 10}, {"top_p": 0.8}):
            base = filtered_probs(row, SamplingParams(temperature=0.9, **kw))
            zero = filtered_probs(row, SamplingParams(temperature=0.9, min_p=0.0, **kw))
            assert torch.equal(base, zero)
        # min-p then top-k: the kept set is the intersection
        both = filtered_probs(row, SamplingParams(min_p=0.2, top_k=10))
        mp = filtered_probs(row, SamplingParams(min_p=0.2))
        tk = filtered_probs(row, SamplingParams(top_k=10))
        assert torch.equal(both > 0, (mp > 0) & (tk > 0))


def test_min_tokens_matches_transformers_for_eos():
    logits = rand_logits(1, seed=4)[0]
    prompt = [3, 4, 5]
    p = SamplingParams(min_tokens=3)
    for n in range(5):
        out = list(range(10, 10 + n))
        ref = MinNewTokensLengthLogitsProcessor(
            prompt_length_to_skip=len(prompt), min_new_tokens=3, eos_token_id=list(EOS))
        want = ref(torch.tensor([prompt + out]), logits[None].clone())[0]
        assert torch.equal(one(logits, p, prompt, out), want)
        assert (want[EOS[0]] == NEG) == (n < 3)


def test_min_tokens_stop_ids_ignore_eos_and_release():
    logits = rand_logits(1, seed=5)[0]
    eos = (2, 3)
    p = SamplingParams(min_tokens=2, stop_token_ids=[7, 9, 1000])  # 1000 >= V: ignored
    got = one(logits, p, [1], [4], eos)
    assert torch.isinf(got[[2, 3, 7, 9]]).all() and (got[[2, 3, 7, 9]] < 0).all()
    keep = torch.ones(V, dtype=torch.bool)
    keep[[2, 3, 7, 9]] = False
    assert torch.equal(got[keep], logits[keep])
    q = SamplingParams(min_tokens=2, stop_token_ids=[7], ignore_eos=True)
    got = one(logits, q, [1], [4], eos)
    assert got[7] == NEG and torch.equal(got[[2, 3]], logits[[2, 3]])
    assert torch.equal(one(logits, p, [1], [4, 5], eos), logits)  # len(out) == min_tokens
    assert torch.equal(one(logits, p, [1], [4, 5, 6], eos), logits)


def test_allowed_token_ids():
    logits = rand_logits(1, seed=6)[0]
    allowed = [4, 17, 33, V + 5]  # V + 5: ignored
    got = one(logits, SamplingParams(allowed_token_ids=allowed), [1], [])
    finite = torch.isfinite(got).nonzero().flatten().tolist()
    assert finite == [4, 17, 33]
    assert torch.equal(got[[4, 17, 33]], logits[[4, 17, 33]])
    assert int(got.argmax()) == [4, 17, 33][int(logits[[4, 17, 33]].argmax())]


def test_mixed_batch_equals_rows_alone_and_plain_rows_bit_identical():
    logits = rand_logits(6, seed=7).to(torch.bfloat16)
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(temperature=0.5, top_p=0.9),
        SamplingParams(min_tokens=4, stop_token_ids=[8]),
        SamplingParams(allowed_token_ids=[1, 2, 3, 50]),
        SamplingParams(repetition_penalty=0.6, min_tokens=1, allowed_token_ids=[2, 5, 6]),
    ]
    prompts = [[1, 2], [3, 3, 4], [5], [6, 7], [8, 9, 10], [5, 6, 11]]
    outputs = [[12], [13, 4], [], [14], [], []]
    got = apply_processors(logits, params, prompts, outputs, EOS)
    assert got.dtype == torch.float32 and got.shape == (6, V)
    for r in range(6):
        alone = one(logits[r], params[r], prompts[r], outputs[r])
        assert torch.equal(got[r], alone)
        if params[r].needs_processors:
            assert not torch.equal(got[r], logits[r].float())
        else:
            assert torch.equal(got[r], logits[r].float())
    assert got[5, 2] == NEG  # min_tokens bans EOS even though it is allowed
    seen = logits[5, [5, 6]].float()
    assert torch.equal(got[5, [5, 6]], torch.where(seen > 0, seen / 0.6, seen * 0.6))


def test_processors_leave_rng_state_alone():
    g = torch.Generator().manual_seed(123)
    g_state, global_state = g.get_state(), torch.get_rng_state()
    logits = rand_logits(2, seed=8)
    params = [SamplingParams(repetition_penalty=1.2, min_tokens=2, allowed_token_ids=[1, 2]),
              SamplingParams(repetition_penalty=0.9)]
    apply_processors(logits, params, [[1], [2]], [[], [3]], EOS)
    assert torch.equal(g.get_state(), g_state)
    assert torch.equal(torch.get_rng_state(), global_state)


def test_fast_path_returns_same_object():
    logits = rand_logits(3, seed=9).half()
    params = [SamplingParams(), SamplingParams(temperature=0.3, min_p=0.1),
              SamplingParams(repetition_penalty=1.0, min_tokens=0)]
    assert apply_processors(logits, params, [[1]] * 3, [[]] * 3, EOS) is logits


def test_processors_do_not_modify_float32_input():
    logits = rand_logits(2, seed=10)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=2.0, allowed_token_ids=[1]), SamplingParams()]
    got = apply_processors(logits, params, [[1, 2], [3]], [[4], []], EOS)
    assert torch.equal(logits, before) and got is not logits


# ---- frequency / presence penalties and logit_bias (vLLM's formulas and order) ----------------
def test_frequency_and_presence_penalties_by_hand():
    """Row 0 generated [1, 1, 2] after prompt [3]: token 1 loses 2 x 0.5 + 0.25, token 2
    loses 0.5 + 0.25, token 3 (prompt only) and token 0 keep theirs; row 1 asks nothing and
    is untouched."""
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5], [1.0, 2.0, -1.0, 0.5]])
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), SamplingParams()]
    out = apply_processors(logits, params, [[3], [3]], [[1, 1, 2], [1, 1, 2]], [])
    assert out[0].tolist() == [1.0, 0.75, -1.75, 0.5]
    assert torch.equal(out[1], logits[1])


def test_negative_penalties_reward_repeats():
    logits = torch.zeros(1, 3)
    out = apply_processors(logits, [SamplingParams(frequency_penalty=-1.0,
                                                   presence_penalty=-0.5)],
                           [[]], [[2, 2, 2]], [])
    assert out.tolist() == [[0.0, 0.0, 3.5]]


def test_logit_bias_comes_before_repetition_penalty():
    """vLLM adds the bias, then penalises: 1.0 - 2.0 = -1.0 seen -> -1.0 * 2 = -2.0 (the other
    order would give 1.0 / 2 - 2.0 = -1.5)."""
    logits = torch.tensor([[1.0, 0.0, 0.0]])
    p = SamplingParams(logit_bias={"0": -2.0, 2: 3.0}, repetition_penalty=2.0)
    out = apply_processors(logits, [p], [[0]], [[]], [])
    assert out.tolist() == [[-2.0, 0.0, 3.0]]
    assert p.logit_bias == ((0, -2.0), (2, 3.0))  # normalised: sorted (id, bias) pairs


def test_logit_bias_matches_transformers_sequence_bias():
    from transformers import SequenceBiasLogitsProcessor

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 50, generator=g)
    bias = {4: 1.5, 17: -3.0, 49: 0.25}
    theirs = SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})(
        torch.tensor([[1, 2], [3, 5]]), logits.clone())
    ours = apply_processors(logits, [SamplingParams(logit_bias=bias)] * 2, [[1, 2], [3, 5]],
                            [[], []], [])
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("kwargs", [
    {"frequency_penalty": 2.5}, {"presence_penalty": -3}, {"logit_bias": {"a": 1}},
    {"logit_bias": {5: float("nan")}}, {"logit_bias": {5: 101}}, {"logit_bias": {-1: 1}},
    {"logit_bias": [(1, 2, 3)]}])
def test_bad_penalties_and_biases_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


def test_bad_words_ban_the_last_token_after_the_rest():
    """Output [5, 6]: [6, 7] bans 7 (the output ends with 6), [9] bans 9 always, [4, 8] bans
    nothing (the output does not end with 4); another row is untouched."""
    logits = torch.zeros(2, 10)
    p = SamplingParams(bad_words_token_ids=[[6, 7], [9], [4, 8]])
    out = apply_processors(logits, [p, SamplingParams()], [[1], [1]], [[5, 6], [5, 6]], [])
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [7, 9]
    assert torch.equal(out[1], logits[1])
    with pytest.raises(ValueError, match="bad_words_token_ids"):
        SamplingParams(bad_words_token_ids=[[]])


# ---- prompt logprobs -------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1024, 5])  # one prefill step; chunks of 5 tokens
def test_prompt_logprobs_match_transformers(tiny_models, budget):
    """Each prompt token's logprob given the ones before it, its rank in the vocabulary and
    the top alternatives, as transformers computes them (fp32); the same again when the
    prompt's KV is cached (a request asking for prompt logprobs takes no cached prefix)."""
    from transformers import AutoModelForCausalLM

    from tests.factories import make_engine

    folder = tiny_models("llama")
    prompt = [5, 17, 9, 33, 2, 41, 8, 12, 60, 7, 3]
    engine = make_engine(folder, max_num_batched_tokens=budget, kv_page_bytes=2048)
    try:
        params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3)
        first = engine.generate([prompt], params)[0]
        again = engine.generate([prompt], params)[0]
    finally:
        engine.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    for out in (first, again):
        got = out.prompt_logprobs
        assert got[0] is None and len(got) == len(prompt)
        for i in range(1, len(prompt)):
            token, value, top, rank = got[i]
            assert token == prompt[i]
            assert abs(value - lp[i - 1, prompt[i]].item()) < 1e-4
            assert rank == 1 + int((lp[i - 1] > lp[i - 1, prompt[i]]).sum())  # in the vocab
            want = torch.topk(lp[i - 1], 3)
            assert [t for t, _ in top] == want.indices.tolist()
    assert again.cached_tokens == 0 and again.prompt_logprobs == first.prompt_logprobs
