"""What a webhook carries: the task's /query_result entry (as a poll would return it at that moment)."""
from __future__ import annotations

from service.config import Settings
from service.ports import Backend
from service.records import TaskRecord
from service.webhooks import WebhookNotifier

from .results import entry_for


def build_notifier(settings: Settings, backend: Backend) -> WebhookNotifier:
    def payload(record: TaskRecord) -> dict:
        return entry_for(record.task_id, record, settings, None)

    return WebhookNotifier(backend.store, payload, key=settings.api_key,
                           allow_private=settings.webhook_allow_private, attempts=settings.webhook_attempts)


__all__ = ["build_notifier"]
