"""Many answers at once: a worker runs more generations than it has database connections."""

from __future__ import annotations

import time

import pytest

from tests.helpers import start, wait_status

pytestmark = pytest.mark.e2e

# More than the worker's database pool holds (tidechat/config.py: 30, no overflow).
GENERATIONS = 40
FIRST_TOKEN_DELAY = 8.0


def test_more_generations_than_database_connections_all_reach_the_model(
    http, other_http, model_server
):
    # A generation used to hold a pooled database connection for its whole stream, so the
    # pool's next one waited for the first to finish before it could even call the model.
    model = model_server.script(chunks=["ok"], first_delay=FIRST_TOKEN_DELAY)
    count = GENERATIONS
    clients = [http, other_http]  # two owners: each stays under the per-owner rate limit
    gens = [(clients[i % 2], start(clients[i % 2], model)[1]) for i in range(count)]

    deadline = time.monotonic() + 60
    while len(model_server.requests_for(model)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    starts = sorted(r.started for r in model_server.requests_for(model))
    assert len(starts) == count
    # Every call began before any could have finished: none waited for another to end.
    assert starts[-1] - starts[0] < FIRST_TOKEN_DELAY

    for client, gen in gens:
        final = wait_status(client, gen["id"], {"done", "error", "cancelled"}, timeout=60)
        assert (final["status"], final["text"]) == ("done", "ok")
