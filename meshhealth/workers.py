"""Worker processes that die with the process that started them, however it dies.

The node (and the provider tools) check signatures in a ``forkserver`` process
pool.  Nothing in :mod:`multiprocessing` ends those workers when their parent
is killed (``kill -9``, the OOM killer): a worker blocks for ever reading its
call queue, whose write end it holds itself; the forkserver stays while any
worker holds its "alive" pipe; the resource tracker stays while anyone holds
its pipe.  Three ``kill -9`` of a node left nine processes behind.

So every pool gets a *lifeline*: a pipe whose only write end the parent
holds, never writes to, and never closes while it lives.  Each worker's
initializer starts a daemon thread blocked on the read end; when the parent
is gone the kernel closes the write end, the read returns EOF and the
worker ``os._exit``\\ s.  With the workers gone, the forkserver sees EOF on
its alive pipe and exits, and then the resource tracker sees EOF on its own
and exits: the whole tree follows the parent within a second.  Unlike
``PR_SET_PDEATHSIG`` (Linux only, and about the worker's parent, which with
a forkserver is the forkserver), a pipe's EOF does not care who forked whom,
and unlike polling the parent's pid it is immediate and not fooled by a
zombie or a reused pid.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import Connection
from typing import Any


def _watch(conn: Connection) -> None:
    try:
        while True:
            conn.recv_bytes()  # the parent never writes: this returns only at EOF
    except (EOFError, OSError):
        pass
    os._exit(0)  # the parent is gone: nobody will read our results


def watch_parent(conn: Connection) -> None:
    """A pool initializer: exit this worker when the parent's lifeline closes."""
    threading.Thread(target=_watch, args=(conn,), name="lifeline", daemon=True).start()


def forkserver_pool(workers: int, preload: list[str]) -> ProcessPoolExecutor:
    """A ``forkserver`` pool whose workers (and so its forkserver and resource
    tracker) exit when this process does.  The lifeline's write end lives as long
    as the pool object: keep the pool referenced for as long as it is used."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload)
    r, w = ctx.Pipe(duplex=False)
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=watch_parent, initargs=(r,))
    pool_any: Any = pool
    pool_any._meshhealth_lifeline = (r, w)  # closed with the pool when it is collected
    return pool
