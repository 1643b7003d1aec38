"""The worker's SDK clients: which connection pool each model stream borrows."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack

import pytest

from tests.helpers import BUSY_GREENLET
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


# In a gevent process (as the worker is): a busy greenlet counts how often the check of an
# idle pooled connection lets it run.
IDLE_CHECK = """
from gevent import monkey; monkey.patch_all()
import json, socket, gevent
from httpcore2._backends.sync import SyncStream
from worker import model_client

model_client.ClientShards(lambda verify: model_client.make_client(CONFIG, verify), 1)
ours, servers = socket.socketpair()
BUSY_GREENLET
gevent.spawn(busy)
gevent.sleep(0)  # (it runs once)
ticks = 0
idle = SyncStream(ours)
open_checks = [idle.get_extra_info("is_readable") for _ in range(100)]
servers.close()
closed_check = idle.get_extra_info("is_readable")
print(json.dumps({"open": any(open_checks), "closed": closed_check, "ticks": ticks}))
"""


def test_checking_an_idle_model_connection_does_not_stall_the_worker():
    """Each request that starts checks every idle connection of its pool for the server's
    EOF. Under gevent's poll each check was a trip through the hub, so a burst's answers
    started behind everything else ready to run (the busy greenlet ran about 280,000 times
    during these 100 checks); now the check runs in place and still sees a closed one."""
    script = IDLE_CHECK.replace("BUSY_GREENLET", BUSY_GREENLET).replace("CONFIG", repr(CONFIG))
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert json.loads(out) == {"open": False, "closed": True, "ticks": 0}
