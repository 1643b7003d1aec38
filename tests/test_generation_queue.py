"""A generation's task as the web queues it: the very message Celery's ``send_task`` would
push (so the worker decodes it the same way), on the list of its priority level.

Every end-to-end test runs such messages through the real worker; these check the message
itself, so that a Celery or kombu upgrade that changes theirs fails here, by name.
"""

from __future__ import annotations

import base64
import json

import pytest

from tidechat import limits
from worker import GENERATE_TASK, enqueue_generation

# Fresh for each message: compared by shape only.
_IDS = {"id", "root_id", "correlation_id", "delivery_tag"}


@pytest.fixture
def app(make_app, key_prefix, redis_client):
    # A queue no worker reads: the messages stay where they were pushed.
    app = make_app(TIDECHAT_CELERY_QUEUE=key_prefix + "queue-check")
    redis_client.delete(*level_lists(app))
    yield app
    redis_client.delete(*level_lists(app))


def level_lists(app) -> list[str]:
    keys = app.extensions["redis_keys"]
    return limits.queue_names(keys.celery_queue(app.config["CELERY_QUEUE"]))


def without_ids(message: dict) -> dict:
    def strip(part: dict) -> dict:
        return {k: ("<id>" if k in _IDS else v) for k, v in part.items()}

    return {
        **message,
        "body": None,
        "headers": {**strip(message["headers"]), "argsrepr": None},
        "properties": strip(message["properties"]),
    }


def test_the_pushed_task_is_the_message_send_task_would_queue(app, redis_client):
    lists = level_lists(app)
    with app.app_context():
        app.extensions["celery"].send_task(GENERATE_TASK, args=["gen-a"], priority=2)
        enqueue_generation(app, "gen-b", 2)
    ours, theirs = [json.loads(m) for m in redis_client.lrange(lists[2], 0, -1)]  # newest first

    assert without_ids(ours) == without_ids(theirs)
    assert ours["headers"]["id"] == ours["properties"]["correlation_id"] != theirs["headers"]["id"]
    assert ours["headers"]["argsrepr"] == "['gen-b']"
    args, kwargs, _embed = json.loads(base64.b64decode(ours["body"]))
    assert (args, kwargs) == (["gen-b"], {})


def test_each_priority_has_its_list_and_one_out_of_range_goes_to_the_nearest(app, redis_client):
    lists = level_lists(app)
    with app.app_context():
        for priority in (-1, 0, 1, 2, 3, 9):
            enqueue_generation(app, f"gen-{priority}", priority)

    def gids(key: str) -> list[str]:
        return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0]
                for m in reversed(redis_client.lrange(key, 0, -1))]  # fmt: skip

    assert [gids(key) for key in lists] == [
        ["gen--1", "gen-0"], ["gen-1"], ["gen-2"], ["gen-3", "gen-9"]
    ]  # fmt: skip
    with app.app_context():
        assert limits.queue_depth(app) == 6
