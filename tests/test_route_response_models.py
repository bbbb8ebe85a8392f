"""Routes are annotated (mypy --strict on handlers), and FastAPI reads a route's return annotation as
its response model unless it is a Response. A route that returns the envelope dict (`-> Enveloped`)
must say response_model=None: otherwise FastAPI validates every body a second time and merges a
generated schema into the one documented in `responses` (/openapi.json)."""
from __future__ import annotations

import importlib
import pkgutil

from fastapi import APIRouter
from fastapi.routing import APIRoute

import handlers


def _routes() -> list[APIRoute]:
    found: list[APIRoute] = []
    for info in pkgutil.walk_packages(handlers.__path__, "handlers."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, APIRouter):
                found += [r for r in value.routes if isinstance(r, APIRoute) and r not in found]
    return found


def test_no_route_takes_its_return_annotation_as_a_response_model() -> None:
    routes = _routes()
    assert len(routes) > 30  # every router of both APIs was found
    inferred = sorted(f"{sorted(r.methods)} {r.path}: {r.response_model}" for r in routes if r.response_model is not None)
    assert inferred == []
