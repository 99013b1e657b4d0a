"""The server's engine loop (in process, tiny model): what its calls are told when the model fails or they leave."""

from __future__ import annotations

import asyncio

import pytest

from personavec.engine.decoder import Engine, Request
from personavec.model.layers import decoder_layers
from personavec.serve.worker import Worker


async def answer(queue: asyncio.Queue) -> tuple:
    while (event := await asyncio.wait_for(queue.get(), 60))[0] == "token":
        pass
    return event


def fail(lm, times: int):
    """Make the model's forward raise ``times`` times (the kind of failure a GPU can have at any step)."""
    left = {"n": times}

    def out_of_memory(module, args):
        if left["n"]:
            left["n"] -= 1
            raise RuntimeError("CUDA out of memory")

    return decoder_layers(lm.model)[1].register_forward_pre_hook(out_of_memory)


def on_failing_model(lm, times: int, max_batch: int, calls):
    """``asyncio.run(calls(worker))`` on a worker whose model fails ``times`` times; (worker, what calls returned)."""
    handle = fail(lm, times)
    worker = Worker(lm, max_batch=max_batch)
    try:
        return worker, asyncio.run(calls(worker))
    finally:
        handle.remove()
        worker.close()


def alone(lm, prompt: str, n: int) -> list[int]:
    return next(iter(Engine(lm, max_batch=1).generate([Request(prompt, n)]))).token_ids


def test_a_failed_model_step_costs_its_requests_only_and_serving_goes_on(lm):
    prompt = lm.format_chat("Hi")

    async def calls(worker):
        first = await answer(worker.submit(Request(prompt, 6, key=worker.next_key())))
        second = await answer(worker.submit(Request(prompt, 6, key=worker.next_key())))
        return first, second

    worker, (first, second) = on_failing_model(lm, 1, 2, calls)
    assert first[0] == "error" and "CUDA out of memory" in first[1]
    assert second[0] == "done" and second[1].token_ids == alone(lm, prompt, 6)
    assert worker.status()["failures"] == 1 and worker.status()["in_flight"] == 0
    assert not worker.feed.cancelled()


def test_a_failed_step_spares_the_requests_still_waiting(lm):
    """One slot: A is decoding when the model fails, B waits. A gets the error; B is answered as if alone."""
    prompt = lm.format_chat("Hi")

    async def calls(worker):
        a = worker.submit(Request(prompt, 6, key=worker.next_key()))
        b = worker.submit(Request(prompt, 6, key=worker.next_key()))
        return await answer(a), await answer(b)

    _, (a, b) = on_failing_model(lm, 1, 1, calls)
    assert a[0] == "error" and b[0] == "done" and b[1].token_ids == alone(lm, prompt, 6)


def test_a_model_that_keeps_failing_stops_the_server_with_a_clear_503(lm):
    from personavec.serve.policy import BadRequest
    from personavec.serve.worker import FAILURES_IN_A_ROW

    async def calls(worker):
        events = [await answer(worker.submit(Request(lm.format_chat("Hi"), 4, key=worker.next_key())))
                  for _ in range(FAILURES_IN_A_ROW)]
        with pytest.raises(BadRequest) as refused:
            worker.submit(Request(lm.format_chat("Hi"), 4, key=worker.next_key()))
        return events, refused.value

    _, (events, refused) = on_failing_model(lm, 10**6, 2, calls)
    assert all(e[0] == "error" for e in events)
    assert refused.status == 503 and "restart" in refused.message


def test_a_caller_whose_event_loop_is_gone_does_not_stop_the_engine(lm):
    worker = Worker(lm, max_batch=2)

    async def leave():  # submits, then its loop ends while the answer is being generated
        worker.submit(Request(lm.format_chat("Hi"), 40, key=worker.next_key(), ignore_eos=True))

    async def call():
        return await answer(worker.submit(Request(lm.format_chat("Hi"), 4, key=worker.next_key())))

    try:
        asyncio.run(leave())
        event = asyncio.run(call())
    finally:
        worker.close()
    assert event[0] == "done" and worker.status()["failures"] == 0


def test_a_cancel_after_the_answer_leaves_nothing_behind(lm):
    worker = Worker(lm, max_batch=2)

    async def call():
        key = worker.next_key()
        event = await answer(worker.submit(Request(lm.format_chat("Hi"), 4, key=key)))
        worker.cancel(key)  # the caller went away just after its answer was ready
        return event

    try:
        event = asyncio.run(call())
    finally:
        worker.close()
    assert event[0] == "done" and not worker.feed.cancelled() and worker.status()["cancelled"] == 0
