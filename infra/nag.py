"""cdk-nag: the AwsSolutions and Serverless rule packs, and reasoned acknowledgments next to resources.

`add_checks(app)` registers both packs as CDK validation plugins (app.py does, so `cdk synth` stops
on a finding; tests/test_infra.py reads the same report). `suppress(construct, (rule, reason), ...)`
is called where a resource is defined, so each reason sits next to what it excuses. A rule id is
the pack's own ("AwsSolutions-S1"; IAM5 findings name their wildcard, "AwsSolutions-IAM5[Resource::...]").
"""
from __future__ import annotations

from aws_cdk import Acknowledgment, Validations
from cdk_nag import AwsSolutionsChecks, ServerlessChecks
from constructs import IConstruct

PACKS = ("AwsSolutions", "Serverless")


def add_checks(app: IConstruct) -> None:
    Validations.of(app).add_plugins(AwsSolutionsChecks(app), ServerlessChecks(app))


def suppress(construct: IConstruct, *rules: tuple[str, str]) -> None:
    """Acknowledge each (rule, reason) on `construct` and everything under it."""
    for rule, reason in rules:
        pack = rule.split("-", 1)[0]
        assert pack in PACKS, rule
        Validations.of(construct).acknowledge(Acknowledgment(id=f"{pack}::{rule}", reason=reason))
