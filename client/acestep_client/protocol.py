"""What the sync and async clients share: building requests and reading answers (waiting.py: the wait).

The clients only move bytes (httpx.Client / httpx.AsyncClient); everything that decides what to
send and what an answer means lives here, once.
"""
from __future__ import annotations

import io
import json
import os
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, Optional, Sequence, Union
from urllib.parse import quote, urlsplit

import httpx

from ._version import __version__
from .errors import APIError, AuthError, NotSupported, ServerUnreachable

DEFAULT_URL = "http://127.0.0.1:8001"
URL_ENV, KEY_ENV = "ACESTEP_API_URL", "ACESTEP_API_KEY"
ROUTE_MISSING = "Not Found"  # FastAPI's detail for a path it has no route for (404) - not "task not found"


def resolve(api_url: Optional[str], api_key: Optional[str]) -> tuple[str, Optional[str]]:
    """Arguments first, then ACESTEP_API_URL / ACESTEP_API_KEY, then the local default server."""
    url = (api_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get(KEY_ENV) or None
    return url, key


USER_AGENT = f"acestep-client/{__version__} python-httpx/{httpx.__version__}"


def auth_headers(api_key: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def client_headers(api_key: Optional[str], user_agent: str) -> dict[str, str]:
    """Auth, and this client's User-Agent unless the caller's httpx client already has its own."""
    headers = auth_headers(api_key)
    if user_agent.startswith("python-httpx/"):
        headers["User-Agent"] = USER_AGENT
    return headers


Reader = Callable[[httpx.Response, "Call"], Any]


@dataclass
class Call:
    """One HTTP request, described; `send` kwargs for httpx. `url`, when set, is absolute (a presigned
    upload) and goes without the API key unless `with_key`; `reader` makes the answer what the caller
    gets (default: the envelope's `data`, see `read`)."""
    method: str
    path: str
    json: Any = None
    data: Optional[dict] = None
    files: Optional[dict] = None
    headers: dict = field(default_factory=dict)
    content: Optional[bytes] = None
    url: Optional[str] = None
    with_key: bool = True
    reader: Optional[Reader] = None

    def kwargs(self) -> dict:
        out: dict[str, Any] = {"headers": self.headers}
        if self.content is not None:
            out["content"] = self.content
        if self.json is not None:
            out["json"] = self.json
        if self.data is not None:
            out["data"] = self.data
        if self.files is not None:
            out["files"] = self.files
        return out


def submit_call(fields: dict, src_audio: Optional[str] = None, reference_audio: Optional[str] = None,
                idempotency_key: Optional[str] = None) -> Call:
    """POST /release_task: JSON, or multipart when audio files are sent (upstream's file fields).

    An Idempotency-Key (a fresh one unless given) makes a retried submit return the first task on
    this server; upstream ignores the header."""
    fields = {k: v for k, v in fields.items() if v is not None}
    headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
    files = {role: path for role, path in (("src_audio", src_audio), ("reference_audio", reference_audio)) if path}
    if not files:
        return Call("POST", "/release_task", json=fields, headers=headers)
    form = {k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in fields.items()}
    opened = {role: (os.path.basename(path), open(path, "rb")) for role, path in files.items()}
    return Call("POST", "/release_task", data=form, files=opened, headers=headers)


Names = Union[str, Sequence[str]]
Scales = Union[float, Sequence[float]]


def adapter_fields(adapter: Optional[Names], adapter_scale: Optional[Scales]) -> dict[str, Any]:
    """The request's `adapter`/`adapter_scale` (acestep.cpp's names): one name or a list (stacked, at most 4 on
    this server); one scale for all or one per adapter. `adapter=""` or `[]` asks for none, even when the
    server has a default adapter (/v1/lora/load); None leaves the fields out (the default applies)."""
    out: dict[str, Any] = {}
    if adapter is not None:
        out["adapter"] = adapter if isinstance(adapter, str) else list(adapter)
    if adapter_scale is not None:
        out["adapter_scale"] = adapter_scale if isinstance(adapter_scale, (int, float)) else list(adapter_scale)
    return out


# What the server takes as an adapter upload (engine/adapter_manifest.py): one .safetensors (PEFT or LyCORIS
# keys) or a .zip of a PEFT folder (adapter_config.json + adapter_model.safetensors).
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
LYCORIS_FILE = "lokr_weights.safetensors"


def adapter_file(path: str) -> tuple[str, bytes]:
    """(file name, bytes) to upload for `path`: a .safetensors or .zip as is; a folder as upstream's trainer
    writes it -- a PEFT folder (or one holding final/) is zipped, its two PEFT files only (not the optimizer
    state beside them); a LyCORIS folder sends its lokr_weights.safetensors. The name is the folder's."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        name = os.path.basename(path.rstrip(os.sep))
        for root in (path, os.path.join(path, "final")):
            if os.path.isfile(os.path.join(root, PEFT_FILES[1])):
                buffer = io.BytesIO()
                with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:  # safetensors do not compress
                    for member in PEFT_FILES:
                        if os.path.isfile(os.path.join(root, member)):
                            zf.write(os.path.join(root, member), member)
                return name + ".zip", buffer.getvalue()
        if os.path.isfile(os.path.join(path, LYCORIS_FILE)):
            with open(os.path.join(path, LYCORIS_FILE), "rb") as f:
                return name + ".safetensors", f.read()
        raise ValueError(f"{path}: a folder without {PEFT_FILES[1]} (PEFT) or {LYCORIS_FILE} (LyCORIS)")
    if not path.endswith((".safetensors", ".zip")):
        raise ValueError(f"{path}: an adapter is a .safetensors file, a .zip of a PEFT folder, or such a folder")
    with open(path, "rb") as f:
        return os.path.basename(path), f.read()


def adapters_call() -> Call:
    return Call("GET", "/v1/adapters")


def adapter_ticket_call(filename: str) -> Call:
    """POST /v1/adapters/uploads: where to PUT the file (S3 on AWS: any size, past Lambda's 6 MB)."""
    return Call("POST", "/v1/adapters/uploads", json={"filename": filename})


def adapter_put(base_url: str, ticket: dict, data: bytes) -> Call:
    """The PUT of an upload ticket, to its absolute URL. A presigned URL of another origin (S3) is signed
    already, and S3 refuses a second Authorization: the API key goes to this server only."""
    url = absolute(base_url, str(ticket["upload_url"]))
    same_origin = urlsplit(url)[:2] == urlsplit(base_url)[:2]
    headers = {str(k): str(v) for k, v in (ticket.get("headers") or {}).items()}
    headers.setdefault("Content-Type", "application/octet-stream")
    return Call(str(ticket.get("method") or "PUT"), urlsplit(url).path, headers=headers, content=data, url=url,
                with_key=same_origin, reader=read_upload)


def register_adapter_call(key: str, name: Optional[str], model: Optional[str], replace: bool) -> Call:
    body: dict[str, Any] = {"key": key, "replace": replace}
    if name:
        body["name"] = name
    if model:
        body["model"] = model
    return Call("POST", "/v1/adapters", json=body)


def read_upload(response: httpx.Response, call: Call) -> None:
    """The PUT's answer: this server's envelope, or S3's empty 200 (its errors are XML)."""
    if response.status_code >= 400:
        read(response, call)


def models_call() -> Call:
    """GET /v1/models: the OpenRouter-style list, read whole (its `data` is the list, not an envelope's)."""
    return Call("GET", "/v1/models", reader=read_whole)


def delete_adapter_call(name: str) -> Call:
    return Call("DELETE", f"/v1/adapters/{quote(name, safe='')}")


def close_files(call: Call) -> None:
    for value in (call.files or {}).values():
        value[1].close()


def query_call(task_ids: list[str]) -> Call:
    return Call("POST", "/query_result", json={"task_id_list": task_ids})


def cancel_call(task_id: str) -> Call:
    return Call("POST", f"/v1/tasks/{quote(task_id, safe='')}/cancel")


def read(response: httpx.Response, call: Call) -> Any:
    """The `data` of a successful envelope; an APIError (AuthError, NotSupported) for anything else."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        detail = body.get("detail", body) if isinstance(body, dict) else (response.text[:500] or response.reason_phrase)
        kind = AuthError if response.status_code in (401, 403) else APIError
        if response.status_code in (404, 405) and detail in (ROUTE_MISSING, "Method Not Allowed"):
            kind = NotSupported
        raise kind(response.status_code, detail, method=call.method, path=call.path)
    if not isinstance(body, dict):
        raise APIError(response.status_code, f"expected a JSON object, got {response.text[:200]!r}",
                       method=call.method, path=call.path)
    code = body.get("code", 200)
    if isinstance(code, int) and code >= 400:  # upstream's soft failure: HTTP 200, code 500
        raise APIError(code, body.get("error") or "request failed", method=call.method, path=call.path)
    return body.get("data", body)


def read_whole(response: httpx.Response, call: Call) -> Any:
    """The whole JSON body of a successful answer (errors as `read` raises them)."""
    read(response, call)
    return response.json()


def answer(response: httpx.Response, call: Call) -> Any:
    """What a client's `_send` returns for `call`."""
    return (call.reader or read)(response, call)


def unreachable(exc: httpx.TransportError, base_url: str) -> ServerUnreachable:
    return ServerUnreachable(f"cannot reach {base_url}: {exc.__class__.__name__}: {exc}")


def absolute(base_url: str, file: str) -> str:
    """Result URLs are relative on upstream and here (`/v1/audio?...`); a presigned one is absolute."""
    return file if file.startswith(("http://", "https://")) else base_url + "/" + file.lstrip("/")


@contextmanager
def landing(path: str) -> Iterator[BinaryIO]:
    """A download's file: written as `path.part`, moved to `path` once whole; a failed one leaves nothing."""
    tmp = path + ".part"
    try:
        with open(tmp, "wb") as out:
            yield out
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def output_path(dest: str, task_id: str, index: int, extension: str) -> str:
    """`dest` itself when it names a file, else `<dest>/<task_id>_<index>.<ext>`."""
    if os.path.isdir(dest) or dest.endswith(os.sep) or not os.path.splitext(dest)[1]:
        os.makedirs(dest, exist_ok=True)
        return os.path.join(dest, f"{task_id}_{index}.{extension}")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    return dest
