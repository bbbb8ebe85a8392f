"""Webhooks: a task's final result POSTed to the URL its client gave (targets: which URLs; delivery: how)."""
from __future__ import annotations

from .delivery import EVENT, SIGNATURE_HEADER, WebhookNotifier, signature
from .targets import Target, WebhookRefused, check_target

__all__ = ["EVENT", "SIGNATURE_HEADER", "Target", "WebhookNotifier", "WebhookRefused", "check_target", "signature"]
