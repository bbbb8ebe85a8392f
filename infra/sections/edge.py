"""CloudFront with a WAF web ACL in front of the HTTP API (optional: HTTP APIs cannot take WAF directly)."""
from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import CfnOutput, Duration, Fn, Stack, Token, aws_apigatewayv2 as apigw, aws_cloudfront as cloudfront
from aws_cdk import aws_cloudfront_origins as origins, aws_s3 as s3, aws_wafv2 as wafv2
from constructs import Construct

from infra.sections.logical_ids import Section
from infra.nag import suppress
from infra.options import StackOptions


@dataclass(frozen=True)
class EdgeProps:
    options: StackOptions
    http_api: apigw.HttpApi
    log_bucket: s3.IBucket  # CloudFront's standard logs, under cloudfront/


class Edge(Section):
    def __init__(self, scope: Construct, construct_id: str, props: EdgeProps):
        super().__init__(scope, construct_id)
        opts = props.options
        web_acl_arn = opts.waf_web_acl_arn or self._web_acl(opts).attr_arn
        # Authorization is part of the cache key only so that CloudFront forwards it on GET; with a
        # 0 s default TTL and the origin sending no Cache-Control, nothing is served from cache.
        no_cache = cloudfront.CachePolicy(
            self, "ApiPassThrough",
            default_ttl=Duration.seconds(0), min_ttl=Duration.seconds(0), max_ttl=Duration.seconds(1),
            header_behavior=cloudfront.CacheHeaderBehavior.allow_list("Authorization"),
            query_string_behavior=cloudfront.CacheQueryStringBehavior.all(),
            cookie_behavior=cloudfront.CacheCookieBehavior.none(),
        )
        self.distribution = distribution = cloudfront.Distribution(
            self, "Edge",
            default_behavior=cloudfront.BehaviorOptions(
                origin=origins.HttpOrigin(Fn.select(2, Fn.split("/", props.http_api.api_endpoint)),
                                          protocol_policy=cloudfront.OriginProtocolPolicy.HTTPS_ONLY),
                allowed_methods=cloudfront.AllowedMethods.ALLOW_ALL,
                viewer_protocol_policy=cloudfront.ViewerProtocolPolicy.HTTPS_ONLY,
                cache_policy=no_cache,
                origin_request_policy=cloudfront.OriginRequestPolicy.ALL_VIEWER_EXCEPT_HOST_HEADER,
            ),
            web_acl_id=web_acl_arn,
            minimum_protocol_version=cloudfront.SecurityPolicyProtocol.TLS_V1_2_2021,
            enable_logging=True,
            log_bucket=props.log_bucket,
            log_file_prefix="cloudfront/",
        )
        suppress(distribution,
                 ("AwsSolutions-CFR1", "No geo restriction: the service has no regional licensing limits."),
                 ("AwsSolutions-CFR4", "Viewers get TLS 1.2+ on the default *.cloudfront.net certificate; "
                                       "this rule flags that certificate whatever the minimum version."))
        self.url = f"https://{distribution.distribution_domain_name}"
        CfnOutput(self, "EdgeUrl", value=self.url)

    def _web_acl(self, opts: StackOptions) -> wafv2.CfnWebACL:
        region = Stack.of(self).region
        if Token.is_unresolved(region) or region != "us-east-1":
            raise ValueError("cloudfront=true creates its WAF web ACL in us-east-1 (CloudFront's WAF region): "
                             "deploy the stack there, or pass waf_web_acl_arn=<an existing CLOUDFRONT-scope ACL>")

        def visibility(name: str) -> wafv2.CfnWebACL.VisibilityConfigProperty:
            return wafv2.CfnWebACL.VisibilityConfigProperty(
                cloud_watch_metrics_enabled=True, metric_name=name, sampled_requests_enabled=True)

        def managed(priority: int, name: str, overrides: tuple[str, ...] = ()) -> wafv2.CfnWebACL.RuleProperty:
            return wafv2.CfnWebACL.RuleProperty(
                name=name, priority=priority, override_action=wafv2.CfnWebACL.OverrideActionProperty(none={}),
                statement=wafv2.CfnWebACL.StatementProperty(
                    managed_rule_group_statement=wafv2.CfnWebACL.ManagedRuleGroupStatementProperty(
                        vendor_name="AWS", name=name,
                        rule_action_overrides=[wafv2.CfnWebACL.RuleActionOverrideProperty(
                            name=rule, action_to_use=wafv2.CfnWebACL.RuleActionProperty(count={}))
                            for rule in overrides] or None)),
                visibility_config=visibility(name))

        return wafv2.CfnWebACL(
            self, "EdgeAcl",
            scope="CLOUDFRONT",
            default_action=wafv2.CfnWebACL.DefaultActionProperty(allow={}),
            visibility_config=visibility("acestep-edge"),
            rules=[
                wafv2.CfnWebACL.RuleProperty(
                    name="RatePerIp", priority=0, action=wafv2.CfnWebACL.RuleActionProperty(block={}),
                    statement=wafv2.CfnWebACL.StatementProperty(
                        rate_based_statement=wafv2.CfnWebACL.RateBasedStatementProperty(
                            limit=opts.waf_rate_limit, aggregate_key_type="IP")),
                    visibility_config=visibility("RatePerIp")),
                # Upload bodies (multipart audio, up to Lambda's 6 MB) exceed the set's 8 KB body rule.
                managed(1, "AWSManagedRulesCommonRuleSet", overrides=("SizeRestrictions_BODY",)),
                managed(2, "AWSManagedRulesKnownBadInputsRuleSet"),
            ],
        )
