#!/usr/bin/env python3
"""CDK app: `cd infra && npx cdk deploy -c instance_type=g6.xlarge ...` (see infra/README.md).

cdk.json runs it through launch.py, under the project venv. Without AWS credentials the CLI gives no
account (CDK_DEFAULT_ACCOUNT unset): the stack's account stays a deploy-time token, and it synthesizes
and passes cdk-nag all the same."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

# The stack reads the table schema from the service package, one directory up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aws_cdk as cdk  # noqa: E402

from infra.acestep_stack import AceStepStack  # noqa: E402
from infra.nag import add_checks  # noqa: E402
from infra.options import StackOptions  # noqa: E402
from infra.worker_engine import EngineOptionError  # noqa: E402
from infra import package_lambda  # noqa: E402

LAMBDA_BUILD_DIR = Path(__file__).resolve().parent / "cdk.out.lambda"


def choose_lambda_package(app: cdk.App, build: Callable[[str], None] = package_lambda.main) -> str:
    """The API ships as a zip (SnapStart, the fast cold start) unless `-c lambda_packaging=image`
    asks for the Dockerfile's `lambda` image; without `-c lambda_asset_dir` the zip is built here.
    Returns the zip's directory, or '' for the image."""
    given = app.node.try_get_context("lambda_asset_dir")
    if given or app.node.try_get_context("lambda_packaging") == "image":
        return given or ""
    build(str(LAMBDA_BUILD_DIR))
    app.node.set_context("lambda_asset_dir", str(LAMBDA_BUILD_DIR))
    return str(LAMBDA_BUILD_DIR)


def main(app: cdk.App | None = None) -> None:
    app = app or cdk.App()  # the CLI's -c values reach it through the environment (CDK_CONTEXT_JSON)
    try:
        StackOptions.from_context(app)  # a bad setting stops the synth here, before the API zip is built
    except EngineOptionError as exc:
        raise SystemExit(f"cdk synth: {exc}") from None
    choose_lambda_package(app)
    AceStepStack(
        app, app.node.try_get_context("stack_name") or "AceStep",
        env=cdk.Environment(account=os.environ.get("CDK_DEFAULT_ACCOUNT"),
                            region=os.environ.get("CDK_DEFAULT_REGION")),
    )
    add_checks(app)  # cdk-nag: synth stops on a finding that is neither fixed nor acknowledged with a reason
    app.synth()


if __name__ == "__main__":
    main()
