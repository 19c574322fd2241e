"""The store of this process: opened on first use, let go of (not closed) after a fork."""

from __future__ import annotations

import os
import threading
from typing import Any

from celery.signals import worker_init, worker_process_init, worker_process_shutdown

from pipeline import tracing
from pipeline.store import Store, open_store, preload

_store: Store | None = None
# The process that opened or set _store: only a forked child must let go of its connections.
_store_pid: int | None = None
_store_lock = threading.Lock()

# Stores opened by threads of the worker's main process (the sweep), referenced here so that
# a pool process forked from the worker never frees (and so never closes, on the parent's
# socket) one of their connections: it lets go of them instead, as of the process's own store.
_thread_stores: list[Store] = []


def get_store() -> Store:
    """This process's store on PIPELINE_DATABASE_URL, opened on first use."""
    global _store, _store_pid
    if _store is None:
        with _store_lock:
            if _store is None:
                _store = open_store()
                _store_pid = os.getpid()
    return _store


def set_store(store: Store | None) -> None:
    """Use this store in this process (tests, embedded mode)."""
    global _store, _store_pid
    _store = store
    _store_pid = os.getpid()


def open_thread_store() -> Store:
    """A store of its own for a long-lived thread of the main process; close_thread_store()
    closes it. The process's store may be swapped or closed by whoever set it."""
    store = open_store()
    _thread_stores.append(store)
    return store


def close_thread_store(store: Store) -> None:
    _thread_stores.remove(store)
    store.close()


@worker_init.connect
def _before_the_pool(**_: Any) -> None:
    # Each pool process would import the store's driver modules on its first task: 0.3 s
    # alone, about a second with eight importing at once on two cores (bench_fleet.py).
    preload()


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # A prefork child inherits the parent's pool: its sockets must not be shared. The solo
    # pool sends this signal too, in the process that opened the store: nothing was forked,
    # and letting go of its connections (without closing them) would only leak them.
    if _store is not None and _store_pid != os.getpid():
        _store.after_fork()
    tracing.after_fork()  # the tracer of this process, when PIPELINE_TRACING is on


@worker_process_shutdown.connect
def _before_exit(**_: Any) -> None:
    tracing.flush()


def _release_thread_stores() -> None:
    for store in _thread_stores:
        store.after_fork()


os.register_at_fork(after_in_child=_release_thread_stores)
