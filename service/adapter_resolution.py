"""A submitted request's adapters, settled at submit: what it names (or the server's default), each found and
checked against the model it runs on; a refusal is a 400 before anything is queued.

A request that sent an adapter field (even an empty one: "no adapter") keeps its own choice; one that sent
none gets the default of /v1/lora/* where that default fits its model (a default made for another model
leaves requests on other models without an adapter rather than refusing them). Each adapter gets the
sha256 of its stored bytes when it was uploaded (what the worker fetches; a client cannot choose it) and none
when it lives under the workers' ACESTEP_LORA_DIR. A default naming an adapter that no longer exists is kept:
the task fails with FailureReason.ADAPTER_MISSING naming it, instead of running without the operator's style.
"""
from __future__ import annotations

import logging

from engine.request import AdapterRef, GenerationRequest

from .adapter_catalog import AdapterCatalog, mismatch
from .adapter_defaults import DefaultAdapterState
from .config import Settings
from .refusals import AdapterRejected

log = logging.getLogger(__name__)


def names_adapters(request: GenerationRequest) -> bool:
    """Whether the client chose the adapters (sent the field, possibly empty) rather than left the default."""
    return "adapters" in request.model_fields_set


class AdapterResolution:
    def __init__(self, settings: Settings, catalog: AdapterCatalog, defaults: DefaultAdapterState):
        self.settings, self.catalog, self.defaults = settings, catalog, defaults

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        chosen = names_adapters(request)
        refs = list(request.adapters) if chosen else self.defaults.current().refs()
        if not refs:
            return request
        model = request.model or next(iter(self.catalog.served_models()), "")
        shape = self.catalog.model_shape(model) if model else None
        settled: list[AdapterRef] = []
        for ref in refs:
            entry = self.catalog.find(ref.name)
            reason = self.catalog.problem(ref.name) if entry is None else mismatch(entry, model, shape)
            if reason is None and entry is not None:
                settled.append(AdapterRef(name=ref.name, scale=ref.scale, sha256=entry.sha256))
            elif not chosen and entry is None:
                # the default names an adapter that is gone (its folder deleted): the task fails saying so
                # (FailureReason.ADAPTER_MISSING) rather than running quietly without the operator's style
                log.warning("default adapter %s no longer exists: %s", ref.name, reason)
                settled.append(AdapterRef(name=ref.name, scale=ref.scale, sha256=None))
            elif chosen:
                raise AdapterRejected(reason or f"adapter {ref.name!r} cannot be used")
            else:
                log.info("default adapter %s skipped for a request on %s: %s", ref.name, model, reason)
        return request.model_copy(update={"adapters": settled})


__all__ = ["AdapterResolution", "names_adapters"]
