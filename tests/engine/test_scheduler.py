import threading
import time

import pytest
import torch

from mellum.engine import NativeEngine, SamplingParams
from tests.engine.helpers import StubModel, stub_config, tiny_model


@pytest.fixture(scope="module")
def engine():
    eng = NativeEngine(tiny_model("tiny-moe"), speculative="lookup", max_batch=4, prefill_chunk=32)
    yield eng
    eng.close()


def test_concurrent_requests_give_the_same_tokens_as_sequential_ones(engine):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 1024, (int(n),), generator=g).tolist() for n in (20, 70, 35, 50, 90, 10)]
    params = SamplingParams(max_new_tokens=16)
    sequential = [engine.generate(p, params).tokens for p in prompts]
    engine.prefix_cache.clear()
    handles = [engine.submit(p, params) for p in prompts]  # 6 requests, 4 slots: batched, queued, joined mid-run
    assert [engine.wait(h).tokens for h in handles] == sequential
    assert engine.busy_slots == 0


def test_a_thousand_cancellations_leave_no_slot_behind(engine):
    g = torch.Generator().manual_seed(12)
    results = []
    # 100 requests cancelled while decoding: rounds of 4 concurrent ones, cancelled once each has streamed a token.
    for _ in range(25):
        round_ = []
        for _ in range(4):
            cancel, started = threading.Event(), threading.Event()
            prompt = torch.randint(0, 1024, (int(torch.randint(8, 60, (1,), generator=g)),), generator=g).tolist()
            handle = engine.submit(prompt, SamplingParams(max_new_tokens=10_000), cancel=cancel,
                                   on_token=lambda _, e=started: e.set())
            round_.append((handle, cancel, started))
        for handle, cancel, started in round_:
            assert started.wait(30)
            cancel.set()
        results += [engine.wait(h) for h, _, _ in round_]
    assert all(r.stop_reason == "cancelled" and 0 < len(r.tokens) < 10_000 for r in results)
    # 900 more: half cancelled before they start, the rest while queued or running.
    cancels, handles = [], []
    for i in range(900):
        cancel = threading.Event()
        if i % 2 == 0:
            cancel.set()
        prompt = torch.randint(0, 1024, (8 + i % 40,), generator=g).tolist()
        handles.append(engine.submit(prompt, SamplingParams(max_new_tokens=200), cancel=cancel))
        cancels.append(cancel)
    for cancel in cancels:
        cancel.set()
    later = [engine.wait(h) for h in handles]
    assert all(r.stop_reason == "cancelled" for r in later[::2])
    assert {r.stop_reason for r in later} <= {"cancelled", "length"}
    assert len(results) + len(later) == 1000
    assert engine.busy_slots == 0 and not engine.scheduler.waiting
    assert sorted(engine.scheduler.free_rows) == list(range(4))


def test_streaming_stop_ids_lines_and_deadline():
    vocab = 16
    # Target: next = token + 1; token 5 is the end of text, tokens 3 and 9 "contain a newline".
    model = StubModel(stub_config(vocab, mtp=False),
                      lambda t: torch.nn.functional.one_hot(torch.tensor((t + 1) % vocab), vocab).float())
    engine = NativeEngine(model, speculative=None, newline_ids=[3, 9], prefix_cache_mb=0)
    try:
        streamed = []
        r = engine.generate([1], SamplingParams(max_new_tokens=10, stop_ids=[5]), on_token=streamed.append)
        assert (r.tokens, r.stop_reason, streamed) == ([2, 3, 4], "stop", [2, 3, 4])
        r = engine.generate([6], SamplingParams(max_new_tokens=10, max_lines=1))
        assert (r.tokens, r.stop_reason) == ([7, 8, 9], "lines")
        r = engine.generate([6], SamplingParams(max_new_tokens=3))
        assert (r.tokens, r.stop_reason) == ([7, 8, 9], "length")
        r = engine.generate([6], SamplingParams(max_new_tokens=3, allowed_first_ids=[12, 13]))
        assert r.tokens == [12, 13, 14]  # the constraint applies to the first token only
        # A constraint over several tokens: asked with the tokens so far, until its first None.
        asked = []

        def allowed_next(generated):
            asked.append(generated)
            return {0: (12, 13), 1: (1,)}.get(len(generated))

        r = engine.generate([6], SamplingParams(max_new_tokens=4, allowed_next=allowed_next))
        assert r.tokens == [12, 1, 2, 3] and asked == [(), (12,), (12, 1)]
        def on_token(_):
            time.sleep(0.02)

        r = engine.generate([1], SamplingParams(max_new_tokens=10_000, deadline_s=0.2), on_token=on_token)
        assert r.stop_reason == "deadline" and 0 < len(r.tokens) < 100
        assert engine.busy_slots == 0
    finally:
        engine.close()


def test_generation_stops_at_the_context_window():
    engine = NativeEngine(tiny_model("tiny-dense"), speculative=None, max_seq_len=40, prefix_cache_mb=0)
    try:
        r = engine.generate(list(range(30)), SamplingParams(max_new_tokens=100))
        assert r.stop_reason == "context" and len(r.tokens) == 10
    finally:
        engine.close()


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"),
    ([1, 2, 5000], "outside the vocabulary"),
    ([1, -3], "outside the vocabulary"),
    ([1, 2.5], "integers"),
    (list(range(1, 600)), "context window"),
])
def test_bad_input_is_refused_with_a_clear_message(engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(prompt, SamplingParams(max_new_tokens=4))


def test_bad_options_are_refused():
    model = tiny_model("tiny-dense")
    with pytest.raises(ValueError, match="MTP"):
        NativeEngine(model, speculative="mtp")
    with pytest.raises(ValueError, match="unknown engine options"):
        NativeEngine(model, prefil_chunk=3)
    with pytest.raises(ValueError, match="quantize"):
        NativeEngine(model, quantize="int4")


def test_score_gives_the_log_probabilities_of_an_uncached_forward(engine):
    reference = tiny_model("tiny-moe")  # the same seed: the weights the engine was built from
    prompt, target = [5, 9, 2, 7, 7, 3], [11, 4, 4]
    got = engine.score(prompt, target)
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + target])).logits[0].float()
    expected = [torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t].item() for i, t in enumerate(target)]
    assert got == pytest.approx(expected, abs=1e-4)
    assert all(x < 0 for x in got)
    engine.generate(prompt, SamplingParams(max_new_tokens=3))  # scoring left the engine working
    assert engine.busy_slots == 0


@pytest.mark.parametrize("prompt, target, message", [
    ([1, 2], [], "target is empty"),
    ([1, 2], [3, 5000], "outside the vocabulary"),
    (list(range(1, 500)), list(range(1, 100)), "window"),
])
def test_score_refuses_bad_input(engine, prompt, target, message):
    with pytest.raises(ValueError, match=message):
        engine.score(prompt, target)


def test_a_failing_callback_fails_only_its_own_request():
    """An on_token or allowed_next that raises ends its request with the error; the request decoding in the same
    batched step (or prefilling beside a lone decode step) carries on. It used to fail every request in the step."""
    engine = NativeEngine(tiny_model("tiny-moe"), speculative="mtp", max_batch=2, prefill_chunk=8, prefix_cache_mb=0)
    try:
        def long_request(on_token=None):
            cancel, started = threading.Event(), threading.Event()

            def streamed(token):
                started.set()
                time.sleep(0.001)
                if on_token is not None:
                    on_token(token)

            handle = engine.submit(list(range(1, 20)), SamplingParams(max_new_tokens=10_000), cancel, streamed)
            assert started.wait(30)
            return handle, cancel

        def fail_on_second_token():
            seen = []

            def on_token(_):
                seen.append(1)
                if len(seen) == 2:  # the first token comes from the prefill, the second from a batched decode step
                    raise KeyError("on_token failed")
            return on_token

        batched = [
            dict(on_token=fail_on_second_token()),
            dict(params=SamplingParams(max_new_tokens=50, allowed_next=lambda g: (7,) if len(g) < 2 else ())),
        ]
        for kind in batched:
            running, cancel = long_request()
            failing = engine.submit(list(range(30, 60)), kind.get("params", SamplingParams(max_new_tokens=50)),
                                    on_token=kind.get("on_token"))
            with pytest.raises(RuntimeError, match="on_token failed|returned no ids"):
                engine.wait(failing)
            cancel.set()
            assert engine.wait(running).stop_reason == "cancelled"
        # A lone decode step (MTP) beside a prefilling request: the decoding request's callback fails.
        prefilling = []

        def fail_while_the_other_prefills(_):
            if prefilling and prefilling[0].row >= 0 and prefilling[0].prefilling:
                raise KeyError("on_token failed")

        failing, _ = long_request(fail_while_the_other_prefills)
        prefilling.append(engine.submit(list(range(1, 400)), SamplingParams(max_new_tokens=3)))
        with pytest.raises(RuntimeError, match="on_token failed"):
            engine.wait(failing)
        assert engine.wait(prefilling[0]).stop_reason == "length"
        assert engine.busy_slots == 0 and sorted(engine.scheduler.free_rows) == [0, 1]
    finally:
        engine.close()


def test_ids_are_checked_as_integers_and_against_the_vocabulary(engine):
    np = pytest.importorskip("numpy")
    prompt = list(range(3, 30))
    want = engine.generate(prompt, SamplingParams(max_new_tokens=4)).tokens
    assert engine.generate(np.array(prompt), SamplingParams(max_new_tokens=4)).tokens == want  # numpy ints are ints
    # An allowed id from allowed_next outside the vocabulary: -1 silently allowed the last token, 1024 an IndexError.
    for bad in (-1, 1024):
        params = SamplingParams(max_new_tokens=4, allowed_next=lambda g, b=bad: (b,) if not g else None)
        with pytest.raises(RuntimeError, match="outside the vocabulary"):
            engine.generate(prompt, params)
    # max_lines cannot be counted without the newline ids: it was ignored and the completion ran on.
    with pytest.raises(ValueError, match="newline_ids"):
        engine.generate(prompt, SamplingParams(max_new_tokens=4, max_lines=1))
    assert engine.busy_slots == 0
