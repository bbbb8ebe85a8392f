"""What a webhook carries: the task's /query_result entry (as a poll would return it at that moment),
with its file URLs absolute under ACESTEP_PUBLIC_BASE_URL when that is set (a receiver has no page
to resolve a relative URL against)."""
from __future__ import annotations

from service.config import Settings
from service.ports import Backend
from service.records import TaskRecord
from service.signing_keys import ephemeral_keys
from service.webhooks import WebhookNotifier

from .results import entry_for


def build_notifier(settings: Settings, backend: Backend) -> WebhookNotifier:
    def payload(record: TaskRecord) -> dict:
        return entry_for(record.task_id, record, settings, None, base_url=settings.public_base_url)

    # Signed with the backend's webhook secret, never the API key. A backend that stores none (AWS
    # without ACESTEP_WEBHOOK_SECRET_ARN, which warns when it is built) gets one for this process,
    # which GET /v1/webhook_secret then shows.
    if backend.webhook_keys is None:
        backend.webhook_keys = ephemeral_keys()
    return WebhookNotifier(backend.store, payload, keys=backend.webhook_keys,
                           allow_private=settings.webhook_allow_private, attempts=settings.webhook_attempts,
                           timeout=settings.webhook_timeout, concurrency=settings.webhook_concurrency)


__all__ = ["build_notifier"]
