"""AWS Lambda entry point: the same FastAPI app, wrapped by Mangum (API Gateway HTTP API or a Function URL).

Configured by the environment the CDK stack sets (ACESTEP_BACKEND=aws, ACESTEP_TABLE_NAME, ...).
The app is built at import time so Lambda's init phase pays for it once per container, not per
request. Nothing here may import torch: the Lambda package is built from the base dependencies
only (Dockerfile target `lambda`), and tests/test_lambda_handler.py checks it.
"""
from __future__ import annotations

from mangum import Mangum

import sys

from entrypoints import bootstrap, heap, snapstart
from service.config import load_settings
from service.observability.logs import configure_logging

OPENROUTER_PATH = "/openrouter"
LAMBDA_CHAT_WAIT_SECONDS = 25.0

# no .env in a Lambda package: the environment is the config
_loaded = load_settings(dotenv_path=None)
# The runtime's own root handler drops INFO; ours writes JSON lines (request ids included) to stdout.
configure_logging(_loaded.log_level, _loaded.log_format, stream=sys.stdout)
settings = bootstrap.resolve_secrets(_loaded)  # the API key from Secrets Manager / SSM, once per cold start
# The OpenAI-compatible API under /openrouter (base_url https://<api>/openrouter/v1). Lambda answers
# once the whole response is ready and API Gateway cuts it at 30 s, so a chat completion waits at
# most OPENROUTER_MAX_WAIT (25 s here): a longer song is answered with its task id (504, or the
# stream's last chunk) and fetched through /query_result. Nothing is lost; long songs belong on
# the asynchronous ACE-Step API (/release_task + /query_result).
if not settings.openrouter_max_wait:
    settings = settings.model_copy(update={"openrouter_max_wait": LAMBDA_CHAT_WAIT_SECONDS})
app = bootstrap.build_app(settings)
app.mount(OPENROUTER_PATH, bootstrap.build_openrouter_app(settings, app))
# lifespan "off": a Lambda container has no long-lived startup/shutdown to run per invocation.
handler = Mangum(app, lifespan="off")
# With SnapStart (the zip deployment) this init runs once per published version: prime it fully
# before the snapshot, and give each restored copy its own randomness and AWS sessions.
if not snapstart.install(handler, settings.api_key):
    heap.settle()  # without SnapStart: settle what init built before the first request
