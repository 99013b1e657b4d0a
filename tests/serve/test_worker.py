"""The server's engine loop (in process, tiny model): what its calls are told when the model fails or they leave."""

from __future__ import annotations

import asyncio

from personavec.engine.decoder import Engine, Request
from personavec.model.layers import decoder_layers
from personavec.serve.worker import Worker


async def answer(queue: asyncio.Queue) -> tuple:
    while (event := await asyncio.wait_for(queue.get(), 60))[0] == "token":
        pass
    return event


def test_a_failed_model_step_costs_its_requests_only_and_serving_goes_on(lm):
    prompt = lm.format_chat("Hi")
    alone = next(iter(Engine(lm, max_batch=1).generate([Request(prompt, 6)]))).token_ids
    failing = {"left": 1}

    def out_of_memory(module, args):  # the kind of failure a GPU can have at any step
        if failing["left"]:
            failing["left"] -= 1
            raise RuntimeError("CUDA out of memory")

    handle = decoder_layers(lm.model)[1].register_forward_pre_hook(out_of_memory)
    worker = Worker(lm, max_batch=2)

    async def calls():
        first = await answer(worker.submit(Request(prompt, 6, key=worker.next_key())))
        second = await answer(worker.submit(Request(prompt, 6, key=worker.next_key())))
        return first, second

    try:
        first, second = asyncio.run(calls())
    finally:
        handle.remove()
        worker.close()
    assert first[0] == "error" and "CUDA out of memory" in first[1]
    assert second[0] == "done" and second[1].token_ids == alone
    assert worker.status()["failures"] == 1 and worker.status()["in_flight"] == 0
    assert not worker.feed.cancelled() and not worker.feed.clear()


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
