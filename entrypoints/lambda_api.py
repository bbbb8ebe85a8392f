"""AWS Lambda entry point: the same FastAPI app, wrapped by Mangum (API Gateway HTTP API or a Function URL).

Configured by the environment the CDK stack sets (ACESTEP_BACKEND=aws, ACESTEP_TABLE_NAME, ...).
The app is built at import time so Lambda's init phase pays for it once per container, not per
request. Nothing here may import torch: the Lambda package is built from the base dependencies
only (Dockerfile target `lambda`), and tests/test_lambda_handler.py checks it.
"""
from __future__ import annotations

from mangum import Mangum

import sys

from entrypoints import bootstrap
from service.config import load_settings
from service.observability.logs import configure_logging

settings = load_settings(dotenv_path=None)  # no .env in a Lambda package: the environment is the config
# The runtime's own root handler drops INFO; ours writes JSON lines (request ids included) to stdout.
configure_logging(settings.log_level, settings.log_format, stream=sys.stdout)
bootstrap.resolve_secrets(settings)  # the API key from Secrets Manager / SSM, once per cold start
app = bootstrap.build_app(settings)
# lifespan "off": a Lambda container has no long-lived startup/shutdown to run per invocation.
handler = Mangum(app, lifespan="off")
