"""Service settings from the environment, `.env` and CLI flags (the upstream ACESTEP_* names).

Precedence: CLI flag > process environment > `.env` file > default. `.env.example` documents
every variable read here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional


def _truthy(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "y", "on"}


def load_dotenv_file(path: str | os.PathLike = ".env") -> None:
    """Load `.env` into os.environ without overriding variables already set."""
    p = Path(path)
    if not p.is_file():
        return
    try:
        from dotenv import load_dotenv
    except ImportError:  # pragma: no cover - python-dotenv is a dependency
        return
    load_dotenv(p, override=False)


def model_name_from_path(path: str) -> str:
    """Upstream names a model by the basename of its config path."""
    return os.path.basename(path.rstrip("/\\"))


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8001
    api_key: str = ""

    # queue / workers
    queue_maxsize: int = 200
    queue_workers: int = 1
    avg_job_seconds: float = 5.0
    avg_window: int = 50
    visibility_timeout: float = 120.0  # lease length; the worker extends it while it runs
    max_receives: int = 3  # deliveries before a task is dead-lettered and marked failed
    # A task still generating this long after it started fails with a timeout; the worker goes on.
    generation_timeout: float = 1800.0
    # No progress from the engine for this long: the call is hung. Its lease lapses (another worker
    # takes the task) and the worker process exits to be restarted.
    stall_timeout: float = 600.0

    # storage backend: "embedded" (SQLite + files) or "aws" (DynamoDB + SQS + S3)
    backend: str = "embedded"
    data_dir: str = "./data"
    aws_region: str = ""
    aws_endpoint_url: str = ""  # moto / localstack
    table_name: str = ""
    queue_url: str = ""
    dlq_url: str = ""
    bucket: str = ""
    task_ttl_days: int = 7

    # models
    checkpoint_dir: str = "./checkpoints"
    config_path: str = "acestep-v15-turbo"
    config_path2: str = ""
    config_path3: str = ""
    device: str = "auto"
    dtype: str = "auto"
    allow_download: bool = True
    demo_if_missing: bool = True  # serve a random-weight tiny model when real weights are absent
    init_llm: str = "auto"
    lm_model_path: str = ""
    lm_backend: str = "vllm"
    lm_device: str = "auto"
    batch_compatible_tasks: bool = True

    # uploads / audio
    max_upload_mb: int = 50
    audio_url_ttl: int = 3600  # lifetime of the signature in result file URLs
    allowed_audio_dirs: list[str] = field(default_factory=list)  # server dirs src_audio_path may read
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed to call the API

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
    def signing_secret(self) -> bytes:
        """Key for audio URL signatures: the API key, or a per-data-dir secret when auth is off."""
        if self.api_key:
            return ("acestep-audio:" + self.api_key).encode()
        return ("acestep-audio-open:" + os.path.abspath(self.data_dir)).encode()


# env var -> Settings attribute
ENV_NAMES = {
    "ACESTEP_API_HOST": "host",
    "ACESTEP_API_PORT": "port",
    "ACESTEP_API_KEY": "api_key",
    "ACESTEP_QUEUE_MAXSIZE": "queue_maxsize",
    "ACESTEP_QUEUE_WORKERS": "queue_workers",
    "ACESTEP_AVG_JOB_SECONDS": "avg_job_seconds",
    "ACESTEP_AVG_WINDOW": "avg_window",
    "ACESTEP_VISIBILITY_TIMEOUT": "visibility_timeout",
    "ACESTEP_MAX_RECEIVES": "max_receives",
    "ACESTEP_GENERATION_TIMEOUT": "generation_timeout",
    "ACESTEP_STALL_TIMEOUT": "stall_timeout",
    "ACESTEP_BACKEND": "backend",
    "ACESTEP_DATA_DIR": "data_dir",
    "ACESTEP_AWS_REGION": "aws_region",
    "ACESTEP_AWS_ENDPOINT_URL": "aws_endpoint_url",
    "ACESTEP_TABLE_NAME": "table_name",
    "ACESTEP_QUEUE_URL": "queue_url",
    "ACESTEP_DLQ_URL": "dlq_url",
    "ACESTEP_BUCKET": "bucket",
    "ACESTEP_TASK_TTL_DAYS": "task_ttl_days",
    "ACESTEP_CHECKPOINT_DIR": "checkpoint_dir",
    "ACESTEP_CONFIG_PATH": "config_path",
    "ACESTEP_CONFIG_PATH2": "config_path2",
    "ACESTEP_CONFIG_PATH3": "config_path3",
    "ACESTEP_DEVICE": "device",
    "ACESTEP_DTYPE": "dtype",
    "ACESTEP_ALLOW_DOWNLOAD": "allow_download",
    "ACESTEP_DEMO_IF_MISSING": "demo_if_missing",
    "ACESTEP_INIT_LLM": "init_llm",
    "ACESTEP_LM_MODEL_PATH": "lm_model_path",
    "ACESTEP_LM_BACKEND": "lm_backend",
    "ACESTEP_LM_DEVICE": "lm_device",
    "ACESTEP_BATCH_TASKS": "batch_compatible_tasks",
    "ACESTEP_MAX_UPLOAD_MB": "max_upload_mb",
    "ACESTEP_AUDIO_URL_TTL": "audio_url_ttl",
    "ACESTEP_ALLOWED_AUDIO_DIRS": "allowed_audio_dirs",
    "ACESTEP_CORS_ORIGINS": "cors_origins",
}


class ConfigError(ValueError):
    pass


def _coerce(attr: str, raw: str):
    f = {f.name: f for f in fields(Settings)}[attr]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "bool":
            return _truthy(raw)
        if kind.startswith("list"):
            return [p for p in (s.strip() for s in raw.split(",")) if p]
        return raw
    except ValueError:
        raise ConfigError(f"{attr}: cannot read {raw!r} as {kind}") from None


def load_settings(overrides: Optional[dict] = None, env: Optional[dict] = None,
                  dotenv_path: Optional[str] = ".env") -> Settings:
    """Build Settings from `.env`, the environment and explicit overrides (CLI flags)."""
    if dotenv_path:
        load_dotenv_file(dotenv_path)
    env = os.environ if env is None else env
    s = Settings()
    for name, attr in ENV_NAMES.items():
        if name in env and env[name] != "":
            setattr(s, attr, _coerce(attr, env[name]))
    if not s.aws_region:
        s.aws_region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    for attr, value in (overrides or {}).items():
        if value is not None:
            setattr(s, attr, value)
    if s.queue_maxsize < 1:
        raise ConfigError("ACESTEP_QUEUE_MAXSIZE must be >= 1")
    if s.backend not in ("embedded", "aws"):
        raise ConfigError("ACESTEP_BACKEND must be 'embedded' or 'aws'")
    return s
