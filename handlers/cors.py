"""Which browser origins may call the APIs (ACESTEP_CORS_ORIGINS), shared by both apps."""
from __future__ import annotations

from service.config import Settings


def cors_origins(settings: Settings) -> list[str]:
    """ACESTEP_CORS_ORIGINS: comma-separated origins ("*" for any); default none."""
    return [o.strip() for o in settings.cors_origins if o and o.strip()]
