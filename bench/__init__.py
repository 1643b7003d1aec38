"""Tidechat's benchmark harness (issue 5): ``python -m bench [--quick]``.

Runs Tidechat (gunicorn+gevent web, Celery gevent worker, Redis) and a direct-proxy
baseline against one loopback model server, drives both from separate client processes,
and writes a table, a JSON result and a plot into ``bench/output/``.
"""
