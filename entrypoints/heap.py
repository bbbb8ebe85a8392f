"""Keep the garbage collector's full passes off the request path.

After start-up the API process holds ~60k long-lived objects (modules, the app, its routes,
pydantic validators) that will never be garbage. A full collection walks all of them every time it
runs (about 50 ms on a small machine, about once every 20,000 polls), and the requests that arrive
meanwhile wait. Freezing them once start-up is done moves them out of the collector's sight
(a full collection then takes about 10 ms); later garbage is collected as before.
"""
from __future__ import annotations

import gc


def settle() -> None:
    """Collect start-up garbage once, then exempt every surviving object from later collections."""
    gc.collect()
    gc.freeze()
