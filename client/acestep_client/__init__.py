"""Python client for the ACE-Step REST API (this server, or an upstream ACE-Step 1.5 API server).

Needs only httpx (tqdm for the CLI's progress bar): no torch, no FastAPI.
"""
from ._version import __version__
from .async_client import AsyncACEStepClient
from .client import ACEStepClient
from .errors import (ACEStepError, APIError, AuthError, NotSupported, ServerUnreachable, TaskFailed, WaitCancelled,
                     WaitTimeout)
from .types import (AdapterInfo, AdapterList, AudioResult, Metas, ModelInfo, ModelList, Submitted, TaskState,
                    TaskStatus)

__all__ = ["__version__", "ACEStepClient", "AsyncACEStepClient", "ACEStepError", "APIError", "AuthError", "NotSupported",
           "ServerUnreachable", "TaskFailed", "WaitCancelled", "WaitTimeout", "AdapterInfo", "AdapterList", "AudioResult",
           "Metas", "ModelInfo", "ModelList", "Submitted", "TaskState", "TaskStatus"]
