"""The deployment's knobs: each a CDK context key of the same name (`cdk deploy -c key=value`)."""
from __future__ import annotations

from dataclasses import dataclass, fields

from constructs import Construct

from infra.worker_engine import KEYS as ENGINE_KEYS, worker_environment


@dataclass
class StackOptions:
    """Deployment knobs; each is also a CDK context key of the same name."""

    # Lambda code: a directory holding the built zip package (SnapStart; infra/app.py builds it
    # unless told `lambda_packaging=image`), or empty for the Dockerfile's `lambda` target as a
    # container image built at deploy time (no SnapStart).
    lambda_asset_dir: str = ""
    # Worker image: a registry URI (e.g. an ECR repo you pushed to), or empty to build the
    # Dockerfile's `worker` target at deploy time.
    worker_image: str = ""
    instance_type: str = "g5.xlarge"  # 1x A10G 24 GB; g6.xlarge (1x L4 24 GB) also works
    # On spot (spot_max_price), the instance group draws from instance_type and these (comma-separated):
    # several pools, so one type running out of spot capacity does not stop the workers. All have 24 GB GPUs.
    spot_instance_types: str = "g6.xlarge,g5.2xlarge,g6.2xlarge"
    max_workers: int = 4
    backlog_per_worker: int = 4  # queued + running tasks one worker is expected to carry
    queue_maxsize: int = 200
    max_receives: int = 3
    lease_seconds: int = 300  # worker lease; it is extended every lease/3 while a task runs
    task_ttl_days: int = 7
    audio_url_ttl: int = 3600
    oldest_message_alarm_seconds: int = 1800
    api_key_secret_arn: str = ""  # an existing secret; empty creates one with a generated key
    alarm_email: str = ""
    config_path: str = "acestep-v15-turbo"
    # A second and third DiT model the workers load beside it (ACESTEP_CONFIG_PATH2/3, e.g. acestep-v15-base);
    # a request picks one with `model`. Empty: none. The API reads them too (/v1/models, /v1/init).
    config_path2: str = ""
    config_path3: str = ""
    destroy_data_on_delete: bool = False  # tear-down removes the table and bucket too
    # Browser origins allowed to call the API and to PUT/GET presigned S3 URLs (comma-separated). The
    # app's ACESTEP_CORS_ORIGINS and the bucket's CORS rule both come from this one value; the HTTP API
    # has no CORS configuration of its own. Empty: no browser origins.
    cors_origins: str = ""
    api_rate_limit: int = 50  # stage throttling: steady requests per second across all clients
    api_burst_limit: int = 100
    # Reserved concurrency of the API Lambda (caps its cost under a flood); 0 = none reserved. An account
    # must keep 100 executions unreserved, so low-limit accounts cannot reserve any.
    api_reserved_concurrency: int = 0
    # Run the GPU instances on spot at this maximum hourly price (e.g. the on-demand price); empty = on-demand.
    spot_max_price: str = ""
    # CloudFront in front of the HTTP API with a WAF web ACL (HTTP APIs cannot take WAF directly). The
    # ACL is created here (needs the stack in us-east-1, CloudFront's WAF region) unless one is given.
    cloudfront: bool = False
    waf_web_acl_arn: str = ""
    waf_rate_limit: int = 1000  # requests per 5 minutes from one IP before WAF blocks it
    # The workers' engine (infra/worker_engine.py): each the worker's ACESTEP_<KEY>, checked at synth by the
    # worker's own settings loader; empty sets nothing (the engine's default). infra/README.md: which per GPU.
    quantize: str = ""  # none | int8 | fp8 (fp8: compute capability 8.9+, e.g. g6's L4)
    quantize_dit: str = ""  # one model's quantisation, over `quantize`
    quantize_lm: str = ""
    offload: str = ""  # none | auto | modules
    init_llm: str = ""  # auto | true | false: whether the 5 Hz LM runs
    lm_model_path: str = ""  # which 5 Hz LM (e.g. acestep-5Hz-lm-0.6B)
    lm_backend: str = ""  # pt | vllm | auto
    lm_device: str = ""

    def __post_init__(self) -> None:
        self.worker_engine_environment()  # a value the worker would refuse stops the synth here, naming its key

    def worker_engine_environment(self) -> dict[str, str]:
        """The worker container's engine variables for the engine keys given (none by default)."""
        return worker_environment({key: getattr(self, key) for key in ENGINE_KEYS})

    @classmethod
    def from_context(cls, scope: Construct) -> "StackOptions":
        values = {}
        for f in fields(cls):
            raw = scope.node.try_get_context(f.name)
            if raw is None:
                continue
            kind = type(getattr(cls, f.name))
            if kind is bool:
                values[f.name] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
            else:
                values[f.name] = kind(raw)
        return cls(**values)
