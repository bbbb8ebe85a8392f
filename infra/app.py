#!/usr/bin/env python3
"""CDK app: `cd infra && cdk deploy -c instance_type=g6.xlarge ...` (see infra/README.md)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# The stack reads the table schema from the service package, one directory up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aws_cdk as cdk  # noqa: E402

from infra.acestep_stack import AceStepStack  # noqa: E402
from infra.nag import add_checks  # noqa: E402


def main() -> None:
    app = cdk.App()
    AceStepStack(
        app, app.node.try_get_context("stack_name") or "AceStep",
        env=cdk.Environment(account=os.environ.get("CDK_DEFAULT_ACCOUNT"),
                            region=os.environ.get("CDK_DEFAULT_REGION")),
    )
    add_checks(app)  # cdk-nag: synth stops on a finding that is neither fixed nor acknowledged with a reason
    app.synth()


if __name__ == "__main__":
    main()
