"""The worker's SDK clients: which connection pool each model stream borrows."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from worker import model_client

CONFIG = {
    "OPENAI_API_KEY": "sk-test",
    "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
    "OPENAI_TIMEOUT": 5,
    "OPENAI_MAX_RETRIES": 0,
    "OPENAI_KEEPALIVE": 60,
}


def test_streams_borrow_the_least_busy_pool_and_a_quiet_process_keeps_to_the_first():
    shards = model_client.ClientShards(lambda verify: model_client.make_client(CONFIG, verify), 3)
    first, second, third = shards.clients
    with shards.lend() as client:  # one at a time: always the first pool, whose idle
        assert client is first  # connection the next stream takes again
    with shards.lend() as client:
        assert client is first
    with ExitStack() as stack:  # under load, spread over the pools
        lent = [stack.enter_context(shards.lend()) for _ in range(4)]
        assert lent == [first, second, third, first]
        assert shards.busy == [2, 1, 1]
    assert shards.busy == [0, 0, 0]  # each stream gives its pool back, however it ends
    with pytest.raises(RuntimeError), shards.lend():
        raise RuntimeError("the stream failed")
    assert shards.busy == [0, 0, 0]
