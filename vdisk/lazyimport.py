"""Modules that are loaded on their first use instead of at import.

trio imports `ssl` and `hmac` at start-up for its TLS and DTLS helpers, which load
OpenSSL's libssl and libcrypto: about 5 MiB of resident memory in a daemon that serves
local images and never opens a TLS connection. `defer(name)` puts a stand-in for the
module into `sys.modules`; `import name` then binds the stand-in, and its first
attribute access imports the real module, which from then on is what `sys.modules`
holds. (importlib.util.LazyLoader cannot do this on Python 3.11: an `import` of a
module already in sys.modules reads its `__spec__`, which makes LazyLoader load it.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_lock = threading.Lock()


class _Deferred(types.ModuleType):
    """Stands in for a module until one of its attributes is read."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(_load(self), attr)

    def __dir__(self) -> list[str]:
        return dir(_load(self))


def _load(stub: _Deferred) -> types.ModuleType:
    name = stub.__name__
    with _lock:
        real = stub.__dict__.get("_deferred_real")
        if real is None:
            if sys.modules.get(name) is stub:
                del sys.modules[name]
            try:
                real = importlib.import_module(name)
            except BaseException:
                sys.modules.setdefault(name, stub)
                raise
            stub.__dict__["_deferred_real"] = real
    return real


def defer(*names: str) -> None:
    """Load each named top-level module on first use (no-op if already imported or absent)."""
    for name in names:
        if name in sys.modules or "." in name:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        stub = _Deferred(name)
        stub.__spec__ = spec
        stub.__file__ = spec.origin
        sys.modules[name] = stub


def is_loaded(name: str) -> bool:
    """Whether the real module name has been imported (not only its stand-in)."""
    mod = sys.modules.get(name)
    return mod is not None and not isinstance(mod, _Deferred)
