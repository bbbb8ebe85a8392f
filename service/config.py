"""Service settings from the environment, `.env` and CLI flags (the upstream ACESTEP_* names).

Precedence: CLI flag > process environment > `.env` file > default. `.env.example` documents
every variable read here. Each field's `validation_alias` is its environment variable.

`Settings(...)` built in code (tests, tools) holds only its keywords and defaults, whatever the
shell exports; `load_settings()` is where the environment and `.env` come in.
"""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from engine.adapter_manifest import adapter_dirs

MB = 1024 * 1024


def model_name_from_path(path: str) -> str:
    """Upstream names a model by the basename of its config path."""
    return os.path.basename(path.rstrip("/\\"))


def _comma_list(value: object) -> object:
    """"a, b" (how an environment variable holds a list) -> ["a", "b"]; lists pass through."""
    if isinstance(value, str):
        return [p for p in (s.strip() for s in value.split(",")) if p]
    return value


CommaList = Annotated[list[str], BeforeValidator(_comma_list)]


def _auto_is_none(value: object) -> object:
    """"auto" (a setting decided at run time) -> None ("None": how a child process's environment passes it)."""
    return None if isinstance(value, str) and value.strip().lower() in ("auto", "none") else value


def _base_url(value: str) -> str:
    """"" or an http(s) origin with an optional path prefix, kept without its trailing slash."""
    value = value.strip().rstrip("/")
    if not value:
        return ""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("must be an http(s) URL such as https://api.example.com (no query)")
    return value


BaseUrl = Annotated[str, AfterValidator(_base_url)]


def _networks(value: list[str]) -> list[str]:
    """Each entry an IP address or a CIDR network ("*": any peer), as uvicorn's forwarded_allow_ips takes them."""
    for item in value:
        if item != "*":
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network (10.0.0.0/8)") from None
    return value


NetworkList = Annotated[list[str], BeforeValidator(_comma_list), AfterValidator(_networks)]

# ACESTEP_INIT_LLM's spellings, read as true / false / auto (entrypoints/bootstrap.py reads only those three)
INIT_LLM_ON = ("true", "1", "yes", "on")
INIT_LLM_OFF = ("false", "0", "no", "off")


def _init_llm(value: object) -> object:
    """"true", "false" or "auto" for any of their spellings (a typo such as "ture" is refused, never read as auto)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if not isinstance(value, str):
        return value
    word = value.strip().lower() or "auto"
    if word in INIT_LLM_ON:
        return "true"
    if word in INIT_LLM_OFF:
        return "false"
    if word != "auto":
        raise ValueError(f"must be true, false or auto (or {'/'.join(INIT_LLM_ON[1:])} for true, "
                         f"{'/'.join(INIT_LLM_OFF[1:])} for false)")
    return word


InitLlm = Annotated[Literal["true", "false", "auto"], BeforeValidator(_init_llm)]


def _env(name: str, default: object, **constraints: Any) -> Any:
    # `constraints`: pydantic's Field keywords; Any out, as Field's own, so it stands as any field's default.
    return Field(default, validation_alias=name, **constraints)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        validate_by_name=True, validate_by_alias=True,  # Settings(port=...) in code; ACESTEP_API_PORT in load_settings
        frozen=True, extra="forbid")  # built once; a different configuration is a copy (model_copy)

    host: str = _env("ACESTEP_API_HOST", "127.0.0.1")
    port: int = _env("ACESTEP_API_PORT", 8001, ge=0, le=65535)
    api_key: str = _env("ACESTEP_API_KEY", "", repr=False)
    # The OpenAI/OpenRouter-compatible API (POST /v1/chat/completions): its own listener and key.
    openrouter_host: str = _env("OPENROUTER_HOST", "127.0.0.1")
    openrouter_port: int = _env("OPENROUTER_PORT", 8002, ge=0, le=65535)  # 0: not served
    openrouter_api_key: str = _env("OPENROUTER_API_KEY", "", repr=False)  # empty: ACESTEP_API_KEY applies
    # How long a chat completion waits for its task (0: ACESTEP_GENERATION_TIMEOUT); past it the
    # task goes on and the answer names it. The Lambda entry sets 25 (API Gateway's 30 s limit).
    openrouter_max_wait: float = _env("OPENROUTER_MAX_WAIT", 0.0, ge=0)

    # queue / workers
    queue_maxsize: int = _env("ACESTEP_QUEUE_MAXSIZE", 200, ge=1)
    queue_workers: int = _env("ACESTEP_QUEUE_WORKERS", 1, ge=0)
    # CPU priority of those workers below the API's (nice), so a generation does not slow the API down
    worker_nice: int = _env("ACESTEP_WORKER_NICE", 10, ge=0, le=19)
    # On stop (Ctrl+C, SIGTERM) a supervised worker may finish its running task this long, then gives it back
    worker_stop_grace: float = _env("ACESTEP_WORKER_STOP_GRACE", 20.0, gt=0)
    avg_job_seconds: float = _env("ACESTEP_AVG_JOB_SECONDS", 5.0)
    avg_window: int = _env("ACESTEP_AVG_WINDOW", 50)
    visibility_timeout: float = _env("ACESTEP_VISIBILITY_TIMEOUT", 120.0)  # lease; the worker extends it while it runs
    max_receives: int = _env("ACESTEP_MAX_RECEIVES", 3)  # deliveries before a task is dead-lettered and marked failed
    # A task still generating this long after it started fails with a timeout; the worker goes on.
    generation_timeout: float = _env("ACESTEP_GENERATION_TIMEOUT", 1800.0, gt=0)
    # No progress from the engine for this long: the call is hung. Its lease lapses (another worker
    # takes the task) and the worker process exits to be restarted.
    stall_timeout: float = _env("ACESTEP_STALL_TIMEOUT", 600.0, gt=0)

    # logs: JSON lines (one object per line, with request/task ids) or plain text for reading by eye
    log_format: Literal["json", "text"] = _env("ACESTEP_LOG_FORMAT", "json")
    log_level: str = _env("ACESTEP_LOG_LEVEL", "INFO")

    # storage backend: "embedded" (SQLite + files) or "aws" (DynamoDB + SQS + S3)
    backend: Literal["embedded", "aws"] = _env("ACESTEP_BACKEND", "embedded")
    data_dir: str = _env("ACESTEP_DATA_DIR", "./data")
    aws_region: str = _env("ACESTEP_AWS_REGION", "")
    aws_endpoint_url: str = _env("ACESTEP_AWS_ENDPOINT_URL", "")  # moto / localstack
    table_name: str = _env("ACESTEP_TABLE_NAME", "")
    queue_url: str = _env("ACESTEP_QUEUE_URL", "")
    dlq_url: str = _env("ACESTEP_DLQ_URL", "")
    # LM-only tasks (/format_input) get a queue of their own, read first; "": they share the main queue
    interactive_queue_url: str = _env("ACESTEP_INTERACTIVE_QUEUE_URL", "")
    bucket: str = _env("ACESTEP_BUCKET", "")
    task_ttl_days: int = _env("ACESTEP_TASK_TTL_DAYS", 7)
    # the ECS worker service the API starts when a task arrives and it runs none (scale from zero)
    ecs_cluster: str = _env("ACESTEP_ECS_CLUSTER", "")
    ecs_service: str = _env("ACESTEP_ECS_SERVICE", "")

    # models
    checkpoint_dir: str = _env("ACESTEP_CHECKPOINT_DIR", "./checkpoints")
    # LoRA/LoKr adapters a request may name ("": <checkpoint_dir>/loras); uploaded ones fetched by workers are kept
    # in ACESTEP_ADAPTER_CACHE ("": <lora_dir>/.uploaded); loaded ones hold at most ACESTEP_ADAPTER_CACHE_MB
    lora_dir: str = _env("ACESTEP_LORA_DIR", "")
    adapter_cache_dir: str = _env("ACESTEP_ADAPTER_CACHE", "")
    adapter_cache_mb: int = _env("ACESTEP_ADAPTER_CACHE_MB", 512, ge=0)
    config_path: str = _env("ACESTEP_CONFIG_PATH", "acestep-v15-turbo")
    config_path2: str = _env("ACESTEP_CONFIG_PATH2", "")
    config_path3: str = _env("ACESTEP_CONFIG_PATH3", "")
    device: str = _env("ACESTEP_DEVICE", "auto")
    dtype: str = _env("ACESTEP_DTYPE", "auto")
    # Weight-only quantisation after loading (engine/quantize.py; fp8 on CUDA 8.9+ only), for the DiT and the
    # 5 Hz LM; ACESTEP_QUANTIZE_DIT / ACESTEP_QUANTIZE_LM override it for one of them ("": as ACESTEP_QUANTIZE)
    quantize: Literal["none", "int8", "fp8"] = _env("ACESTEP_QUANTIZE", "none")
    quantize_dit: Literal["", "none", "int8", "fp8"] = _env("ACESTEP_QUANTIZE_DIT", "")
    quantize_lm: Literal["", "none", "int8", "fp8"] = _env("ACESTEP_QUANTIZE_LM", "")
    # Only the running module on the GPU (engine/offload.py): auto = when all would not fit but the largest does
    offload: Literal["none", "auto", "modules"] = _env("ACESTEP_OFFLOAD", "auto")
    # The CPU VAE's fused Snake (decode and encode) compiled at load (engine/vae_fast.py): auto = full-size VAE
    vae_compile: Literal["auto", "true", "false"] = _env("ACESTEP_VAE_COMPILE", "auto")
    # The transformers LM's KV cache (engine/lm/transformers_backend.py): auto = static on CPU, dynamic elsewhere
    lm_kv_cache: Literal["auto", "static", "dynamic"] = _env("ACESTEP_LM_KV_CACHE", "auto")
    allow_download: bool = _env("ACESTEP_ALLOW_DOWNLOAD", True)
    demo_if_missing: bool = _env("ACESTEP_DEMO_IF_MISSING", True)  # random-weight tiny model when weights are absent
    # /format_input waits this long for a worker's LM (keep it under the Lambda/API Gateway 29 s limit)
    format_timeout: float = _env("ACESTEP_FORMAT_TIMEOUT", 25.0, gt=0)
    # AWS workers: fetch each model from s3://<ACESTEP_BUCKET>/models/<name>/ (acestep-models publish) first
    models_mirror: bool = _env("ACESTEP_MODELS_MIRROR", False)
    init_llm: InitLlm = _env("ACESTEP_INIT_LLM", "auto")  # true | false | auto (INIT_LLM_ON/_OFF synonyms)
    lm_model_path: str = _env("ACESTEP_LM_MODEL_PATH", "")
    # pt | vllm (required: the worker fails to start without it) | auto (vLLM when installed, else pt)
    lm_backend: Literal["pt", "vllm", "auto"] = _env("ACESTEP_LM_BACKEND", "auto")
    lm_device: str = _env("ACESTEP_LM_DEVICE", "auto")
    batch_compatible_tasks: bool = _env("ACESTEP_BATCH_TASKS", True)
    # Worker pipeline: encode/store/record a batch in a second stage while the engine runs the next one
    # (false: everything in sequence; auto/None: on when the engine runs on a GPU, whose diffusion does not
    # need the cores encoding uses). At most ACESTEP_PIPELINE_DEPTH batches wait in that stage; their
    # audio is encoded by ACESTEP_ENCODE_PROCESSES processes (0: one per core but one, at least one).
    pipeline: Annotated[Optional[bool], BeforeValidator(_auto_is_none)] = _env("ACESTEP_PIPELINE", None)
    pipeline_depth: int = _env("ACESTEP_PIPELINE_DEPTH", 2, ge=1, le=16)
    encode_processes: int = _env("ACESTEP_ENCODE_PROCESSES", 0, ge=0)
    # Batch tasks whose song lengths fall in one bucket this many seconds wide (0: only equal lengths).
    # The call runs at the longest and cuts each song, so a batched song differs from one run alone.
    batch_length_bucket: float = _env("ACESTEP_BATCH_LENGTH_BUCKET", 0.0, ge=0)
    # Engine (engine/speedups.py): per-stage timings; a tiny generation at start (auto: on for CUDA);
    # GPU options, off by default and unmeasured so far: torch.compile of the DiT, CUDA graphs
    # (compile mode reduce-overhead), the compile backend, diffusers' attention backend for the DiT.
    stage_timings: bool = _env("ACESTEP_STAGE_TIMINGS", True)
    warmup: Literal["auto", "true", "false"] = _env("ACESTEP_WARMUP", "auto")
    compile_dit: bool = _env("ACESTEP_COMPILE_DIT", False)
    cuda_graphs: bool = _env("ACESTEP_CUDA_GRAPHS", False)
    compile_backend: str = _env("ACESTEP_COMPILE_BACKEND", "inductor")
    attention_backend: str = _env("ACESTEP_ATTENTION_BACKEND", "")

    # webhooks (a task's webhook_url): private/loopback targets only when allowed; tries per delivery
    webhook_allow_private: bool = _env("ACESTEP_WEBHOOK_ALLOW_PRIVATE", False)
    webhook_attempts: int = _env("ACESTEP_WEBHOOK_ATTEMPTS", 5, ge=1, le=20)
    # One attempt's whole time (DNS, connect, send, answer), and how many receivers are called at once
    webhook_timeout: float = _env("ACESTEP_WEBHOOK_TIMEOUT", 10.0, gt=0, le=120)
    webhook_concurrency: int = _env("ACESTEP_WEBHOOK_CONCURRENCY", 8, ge=1, le=128)
    # AWS: the Secrets Manager secret webhooks are signed with (the stack creates it; never an API key)
    webhook_secret_arn: str = _env("ACESTEP_WEBHOOK_SECRET_ARN", "")
    # Where clients reach this API (https://api.example.com): webhook payloads carry absolute file
    # URLs under it. Empty: relative URLs, as /query_result returns them. The CDK stack sets it.
    public_base_url: BaseUrl = _env("ACESTEP_PUBLIC_BASE_URL", "")

    # uploads / audio
    max_upload_mb: int = _env("ACESTEP_MAX_UPLOAD_MB", 50)
    # Largest LoRA/LoKr adapter POST /v1/adapters takes (its bytes pass through the API's memory once)
    max_adapter_mb: int = _env("ACESTEP_MAX_ADAPTER_MB", 256, ge=1, le=4096)
    audio_url_ttl: int = _env("ACESTEP_AUDIO_URL_TTL", 3600)  # lifetime of the signature in result file URLs
    # Refuse (413) tasks costing more than this many audio-second steps (duration x batch x steps); 0: no limit
    max_task_cost: float = _env("ACESTEP_MAX_TASK_COST", 61440.0, ge=0)
    # Per caller (API key, or client address without auth): requests per second (burst: twice that), 0: off
    rate_limit_rps: float = _env("ACESTEP_RATE_LIMIT_RPS", 20.0, ge=0)
    # Proxies whose X-Forwarded-For names the client (addresses or CIDRs); empty: the peer is the
    # client, whatever a request's headers claim (handlers/caller.py)
    trusted_proxies: NetworkList = Field(default_factory=list, validation_alias="ACESTEP_TRUSTED_PROXIES")
    # acestep-api's listeners: seconds a connection has to send each request head (slowloris)
    header_timeout: float = _env("ACESTEP_HEADER_TIMEOUT", 10.0, gt=0, le=300)
    # Per caller: tasks waiting, and tasks waiting or running, before /release_task answers 429
    caller_max_queued: int = _env("ACESTEP_CALLER_MAX_QUEUED", 50, ge=1)
    caller_max_active: int = _env("ACESTEP_CALLER_MAX_ACTIVE", 60, ge=1)
    # Embedded: below this much free disk the API answers 507 and workers wait instead of taking tasks
    min_free_mb: int = _env("ACESTEP_MIN_FREE_MB", 100, ge=0)
    # AWS: the Secrets Manager secret signed URLs are keyed with (the stack creates it)
    signing_secret_arn: str = _env("ACESTEP_SIGNING_SECRET_ARN", "")
    # server dirs src_audio_path may read; browser origins allowed to call the API
    allowed_audio_dirs: CommaList = Field(default_factory=list, validation_alias="ACESTEP_ALLOWED_AUDIO_DIRS")
    cors_origins: CommaList = Field(default_factory=list, validation_alias="ACESTEP_CORS_ORIGINS")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only keywords: load_settings layers the environment and `.env` under them itself.
        return (init_settings,)

    @property
    def dit_quantization(self) -> str:
        """The DiTs' weight-only quantisation: ACESTEP_QUANTIZE_DIT, else ACESTEP_QUANTIZE."""
        return self.quantize_dit or self.quantize

    @property
    def lm_quantization(self) -> str:
        """The 5 Hz LM's: ACESTEP_QUANTIZE_LM, else ACESTEP_QUANTIZE (the worker's load and the synth check read it)."""
        return self.quantize_lm or self.quantize

    @property
    def model_names(self) -> list[str]:
        paths = [self.config_path, self.config_path2, self.config_path3]
        names: list[str] = []
        for p in paths:
            if p and p.strip():
                name = model_name_from_path(p.strip())
                if name not in names:
                    names.append(name)
        return names

    @property
    def default_model(self) -> Optional[str]:
        names = self.model_names
        return names[0] if names else None

    @property
    def max_upload_bytes(self) -> int:
        return max(1, int(self.max_upload_mb)) * MB

    @property
    def max_adapter_bytes(self) -> int:
        return int(self.max_adapter_mb) * MB

    @property
    def resolved_lora_dir(self) -> str:
        return adapter_dirs(self.checkpoint_dir, self.lora_dir, self.adapter_cache_dir)[0]

    @property
    def resolved_adapter_cache_dir(self) -> str:
        return adapter_dirs(self.checkpoint_dir, self.lora_dir, self.adapter_cache_dir)[1]


# env var -> Settings attribute (entrypoints.api_server passes settings to workers by these names)
ENV_NAMES: dict[str, str] = {str(info.validation_alias): name for name, info in Settings.model_fields.items()}


class ConfigError(ValueError):
    pass


def load_dotenv_file(path: str | os.PathLike[str] = ".env") -> None:
    """Load `.env` into os.environ without overriding variables already set.

    Into os.environ, not only into Settings: the AWS secret lookup, hub tokens and the engine read
    their variables from the process environment too.
    """
    if Path(path).is_file():
        from dotenv import load_dotenv

        load_dotenv(path, override=False)


def _config_message(exc: ValidationError) -> str:
    env_of = {attr: name for name, attr in ENV_NAMES.items()}
    parts = []
    for err in exc.errors():
        attr = str(err["loc"][0]) if err.get("loc") else ""
        label = f"{env_of[attr]} ({attr})" if attr in env_of else attr
        parts.append(f"{label}: {err['msg']} (got {err.get('input')!r})")
    return "invalid settings: " + "; ".join(parts)


def load_settings(overrides: Optional[dict[str, Any]] = None, env: Optional[Mapping[str, str]] = None,
                  dotenv_path: Optional[str] = ".env") -> Settings:
    """Build Settings from `.env`, the environment and explicit overrides (CLI flags).

    `.env` goes into os.environ first without overriding it, so the environment wins over the
    file; `env` stands in for os.environ (tests). An empty variable counts as unset. Raises
    ConfigError naming the variable when a value cannot be read.
    """
    if dotenv_path:
        load_dotenv_file(dotenv_path)
    env = os.environ if env is None else env
    values: dict[str, Any] = {attr: env[name] for name, attr in ENV_NAMES.items() if env.get(name)}
    if not values.get("aws_region"):
        values["aws_region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    values.update({attr: v for attr, v in (overrides or {}).items() if v is not None})
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_config_message(exc)) from None
