"""Access to the per-app settings and backend (set by create_app on app.state)."""
from __future__ import annotations

from fastapi import Request

from service.config import Settings
from service.ports import Backend
from service.submitter import Submitter
from service.webhooks import WebhookNotifier


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def backend_of(request: Request) -> Backend:
    return request.app.state.backend


def webhooks_of(request: Request) -> WebhookNotifier:
    return request.app.state.webhooks


def submitter_of(request: Request) -> Submitter:
    return request.app.state.submitter
