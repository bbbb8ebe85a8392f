"""Access to the per-app settings and backend (set by create_app on app.state)."""
from __future__ import annotations

from fastapi import Request

from service.config import Settings
from service.ports import Backend
from service.submitter import Submitter
from service.webhooks import WebhookNotifier


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings  # app.state holds Any; create_app set it
    return settings


def backend_of(request: Request) -> Backend:
    backend: Backend = request.app.state.backend  # app.state holds Any; create_app set it
    return backend


def webhooks_of(request: Request) -> WebhookNotifier:
    webhooks: WebhookNotifier = request.app.state.webhooks  # app.state holds Any; create_app set it
    return webhooks


def submitter_of(request: Request) -> Submitter:
    submitter: Submitter = request.app.state.submitter  # app.state holds Any; create_app set it
    return submitter
