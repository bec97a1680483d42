"""Stores: a URL to an Optuna storage, through the registry (registry.py); one module or package per backend.

Everything outside this package imports from here only (open_store, Store, store_lock, redact, ...), never a backend.
"""

from sweeper.storage.registry import (BACKENDS, FILE_STORES, Backend, Store, gc_paused, open_store,  # noqa: F401
                                      open_storage, redact, register, store_lock, supported)

# Each backend registers itself on import, in the order `sweeper stores` lists them.
from sweeper.storage import local, gsheets, drive, server  # noqa: E402,F401,I001
