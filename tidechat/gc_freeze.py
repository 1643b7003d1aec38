"""Keep the garbage collector off the objects a process builds at startup.

A ready web or worker process holds about 180,000 objects it will keep for its whole life
(modules, classes, the SDKs' models, the app, its clients). CPython's full collection
walks every one of them: 60-130 ms in which a gevent process runs nothing else, no stream,
no request. Allocation is what triggers collections, so they came during bursts: the
slowest bursts of ten answers waited 150-300 ms for a first token (docs/benchmarks.md).
Frozen objects are left out of every collection; what the process allocates afterwards is
still collected as before.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Call once the process is ready to serve: collect what startup left as garbage,
    then move every object still alive into the collector's permanent generation."""
    gc.collect()
    gc.freeze()
