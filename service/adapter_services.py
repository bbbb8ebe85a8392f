"""The adapter use cases of one API process, built once on its settings and backend (handlers/app.py, the
Submitter): one catalog, so its caches are shared by the routes and the submit check."""
from __future__ import annotations

from dataclasses import dataclass

from .adapter_catalog import AdapterCatalog
from .adapter_defaults import DefaultAdapterState
from .adapter_removal import AdapterRemoval
from .adapter_resolution import AdapterResolution
from .adapter_uploads import AdapterUploads
from .config import Settings
from .ports import Backend


@dataclass(frozen=True)
class AdapterServices:
    catalog: AdapterCatalog
    defaults: DefaultAdapterState
    uploads: AdapterUploads
    resolution: AdapterResolution
    removal: AdapterRemoval

    @classmethod
    def build(cls, settings: Settings, backend: Backend) -> "AdapterServices":
        catalog = AdapterCatalog(settings, backend)
        defaults = DefaultAdapterState(settings, backend.store, catalog)
        return cls(catalog, defaults, AdapterUploads(settings, backend.blobs, catalog),
                   AdapterResolution(settings, catalog, defaults),
                   AdapterRemoval(catalog, defaults, backend.store, backend.blobs, settings.queue_maxsize))


__all__ = ["AdapterServices"]
