"""The rollout engine: greedy parity with transformers, resumption, log-probs, capacity."""

import copy

import pytest
import torch

from ossrl.model import GptOss, GptOssConfig, load_pretrained
from ossrl.rollout.engine import Engine, Resume, SamplingParams

from _tolerance import assert_within, rounding_scale

GREEDY = SamplingParams(temperature=0, max_new_tokens=10)
PROMPTS = [[5, 17, 3], [8] * 23, [1], list(range(40, 80))]  # lengths 3, 23, 1, 40


def _model(seed=0, **overrides):
    cfg = GptOssConfig.tiny(**overrides) if overrides else GptOssConfig.tiny()
    torch.manual_seed(seed)
    m = GptOss(cfg).eval()
    with torch.no_grad():  # weights large enough for crisp argmaxes, sinks and routing that matter
        for name, p in m.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return m


def _greedy_reference(m, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids = torch.tensor(seq)
            seq.append(int(m(ids, torch.tensor([0, len(seq)], dtype=torch.int32))[-1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("block_size", [16, 5])  # divides and does not divide the lengths
def test_greedy_matches_full_recompute(block_size):
    m = _model()
    outs = Engine(m, max_cache_tokens=1000, block_size=block_size, step_tokens=32).generate(PROMPTS, GREEDY)
    for p, o in zip(PROMPTS, outs):
        assert o.finish_reason == "length"
        assert o.tokens == _greedy_reference(m, p, 10)


def test_greedy_matches_transformers_generate(tmp_path):
    from transformers import GptOssForCausalLM

    from ossrl.model import save_pretrained

    save_pretrained(_model(1), tmp_path)
    ours = load_pretrained(tmp_path, dtype=torch.float32).eval()
    hf = GptOssForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, experts_implementation="eager").eval()
    outs = Engine(ours, max_cache_tokens=512).generate(PROMPTS, GREEDY)
    for p, o in zip(PROMPTS, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.tokens == ref


def test_resume_equals_generating_the_concatenation():
    m = _model(2)
    eng = Engine(m, max_cache_tokens=512, block_size=8)
    first = eng.generate(PROMPTS[:2], SamplingParams(temperature=0, max_new_tokens=6), keep=True)
    tool_result = [[100, 101, 102], [7]]
    second = eng.generate([Resume(c.handle, t) for c, t in zip(first, tool_result)], GREEDY)
    for p, c1, t, c2 in zip(PROMPTS, first, tool_result, second):
        whole = p + c1.tokens + t
        assert c2.tokens == _greedy_reference(m, whole, 10)
    # resumed sequences were released (keep=False): all blocks are free again
    assert len(eng.cache.free) == eng.num_blocks
    with pytest.raises(ValueError, match="handle"):
        eng.generate([Resume(first[0].handle, [1])], GREEDY)


def test_sampled_logprobs_are_the_models_log_softmax():
    m = _model(3)
    m64 = copy.deepcopy(m).double()
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=12)
    outs = Engine(m, max_cache_tokens=512, seed=5).generate(PROMPTS, params)
    for p, o in zip(PROMPTS, outs):
        seq = p + o.tokens
        ids, cu = torch.tensor(seq), torch.tensor([0, len(seq)], dtype=torch.int32)
        rows = torch.arange(len(p) - 1, len(seq) - 1)
        with torch.no_grad():
            logp = torch.log_softmax(m(ids, cu).float(), -1)[rows]
            logp64 = torch.log_softmax(m64(ids, cu), -1)[rows]
        ref = logp[torch.arange(len(rows)), torch.tensor(o.tokens)]
        # The engine's passes (paged cache, other batch shapes) round differently from this full
        # pass: 4x the full pass's float32 rounding (against float64) on this machine.
        assert_within(torch.tensor(o.logprobs), ref, 4 * rounding_scale((logp, logp64)))


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    m = _model(4)
    params = SamplingParams(temperature=1.0, max_new_tokens=8)
    a = Engine(m, seed=1).generate(PROMPTS, params)
    b = Engine(m, seed=1).generate(PROMPTS, params)
    assert [o.tokens for o in a] == [o.tokens for o in b]
    k1 = Engine(m).generate(PROMPTS, SamplingParams(top_k=1, max_new_tokens=10))
    g = Engine(m).generate(PROMPTS, GREEDY)
    assert [o.tokens for o in k1] == [o.tokens for o in g]


def test_stop_tokens_and_capacity():
    m = _model(5)
    ref = _greedy_reference(m, PROMPTS[0], 10)
    out = Engine(m).generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(ref[3],)))
    assert out[0].finish_reason == "stop" and out[0].tokens == ref[: ref.index(ref[3]) + 1]

    # 64 tokens of cache: the 40-token prompt + 10 fits alone; more prompts than fit at once queue.
    eng = Engine(m, max_cache_tokens=64, block_size=8)
    outs = eng.generate(PROMPTS * 3, GREEDY)
    assert [o.tokens for o in outs] == [o.tokens for o in Engine(m).generate(PROMPTS * 3, GREEDY)]
    # a prompt that can never fit is rejected, never overruns the cache; a long one is cut at capacity
    outs = eng.generate([list(range(70)), list(range(60))], GREEDY)
    assert outs[0].finish_reason == "rejected" and outs[0].tokens == []
    assert outs[1].finish_reason == "length" and len(outs[1].tokens) == 4
    assert len(eng.cache.free) == eng.num_blocks


def test_resumes_that_cannot_grow_in_a_full_cache_are_recomputed():
    """Kept sequences fill the cache; resuming all of them at once cannot fit. The engine drops the
    cache of some and feeds their tokens again: same tokens as with room to spare."""
    m = _model(7)
    prompts = [list(range(10 + i, 34 + i)) for i in range(4)]  # 4 x (24 + 8) tokens = 128
    first = SamplingParams(temperature=0, max_new_tokens=8)
    more = SamplingParams(temperature=0, max_new_tokens=12)

    def run(eng):
        outs = eng.generate(prompts, first, keep=True)
        again = eng.generate([Resume(o.handle, [5, 6, 7]) for o in outs], more)
        return [o.tokens for o in outs], [o.tokens for o in again]

    tight = Engine(m, max_cache_tokens=136, block_size=8)  # 17 blocks: 16 kept, every resume needs 2 more
    assert run(tight) == run(Engine(m, max_cache_tokens=4096, block_size=8))
    assert tight.stats["preemptions"] > 0
    assert len(tight.cache.free) == tight.num_blocks


def test_kept_sequences_are_preempted_when_new_requests_need_their_cache():
    """Sequences kept while their tool calls run fill the cache; a new request does not wait for
    the tools: the kept sequences' caches are dropped (most recently kept first) and recomputed
    when they resume. Same tokens as with room to spare; before, the new request could not start."""
    m = _model(8)
    prompts = [list(range(10 + i, 34 + i)) for i in range(4)]  # 4 x (24 + 8) tokens = 128 = 16 blocks
    first = SamplingParams(temperature=0, max_new_tokens=8)
    other = SamplingParams(temperature=0, max_new_tokens=10)

    def run(eng):
        kept = eng.generate(prompts, first, keep=True)
        new = eng.generate([PROMPTS[3]], other)  # 40 + 10 tokens: 7 blocks
        again = eng.generate([Resume(o.handle, [5, 6, 7]) for o in kept], other)
        return [o.tokens for o in kept], new[0].tokens, [o.tokens for o in again]

    tight = Engine(m, max_cache_tokens=136, block_size=8)  # 17 blocks, 16 of them kept
    assert run(tight) == run(Engine(m, max_cache_tokens=4096, block_size=8))
    assert tight.stats["preemptions"] >= 1
    assert len(tight.cache.free) == tight.num_blocks


def test_cache_is_allocated_and_released_explicitly():
    m = _model(6)
    eng = Engine(m, max_cache_tokens=128)
    assert eng.cache is None
    eng.allocate_cache()
    assert eng.cache is not None
    eng.generate([PROMPTS[0]], GREEDY, keep=True)
    eng.release_cache()
    assert eng.cache is None
    assert eng.generate([PROMPTS[0]], GREEDY)[0].tokens == _greedy_reference(m, PROMPTS[0], 10)


def test_bad_input():
    m = _model()
    eng = Engine(m)
    with pytest.raises(ValueError, match="at least one token"):
        eng.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        eng.generate([[10**6]], GREEDY)
    with pytest.raises(ValueError, match="SamplingParams"):
        SamplingParams(temperature=-1)
