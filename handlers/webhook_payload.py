"""What a webhook carries: the task's /query_result entry (as a poll would return it at that moment),
with its file URLs absolute under ACESTEP_PUBLIC_BASE_URL when that is set (a receiver has no page
to resolve a relative URL against)."""
from __future__ import annotations

from service.config import Settings
from service.ports import Backend
from service.records import TaskRecord
from service.result_parts import with_whole_result
from service.webhooks import WebhookNotifier

from .results import entry_for


def build_notifier(settings: Settings, backend: Backend) -> WebhookNotifier:
    def payload(record: TaskRecord) -> dict:
        whole, _ = with_whole_result(record, backend.blobs)
        return entry_for(record.task_id, whole, settings, None, base_url=settings.public_base_url)

    return WebhookNotifier(backend.store, payload, key=settings.api_key,
                           allow_private=settings.webhook_allow_private, attempts=settings.webhook_attempts)


__all__ = ["build_notifier"]
