"""Webhooks: a task's final result POSTed to the URL its client gave (targets: which URLs; signature:
how receivers verify it; sender: one POST; delivery: the outbox, retries and concurrency)."""
from __future__ import annotations

from .delivery import EVENT, WebhookNotifier
from .signature import secret_text, webhook_id
from .targets import Target, WebhookRefused, check_target, vet_target

__all__ = ["EVENT", "Target", "WebhookNotifier", "WebhookRefused", "check_target", "secret_text",
           "vet_target", "webhook_id"]
