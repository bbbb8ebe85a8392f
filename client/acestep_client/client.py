"""ACEStepClient: the synchronous client (httpx.Client)."""
from __future__ import annotations

import threading
import time
from typing import Any, Optional

import httpx

from . import protocol
from .errors import ACEStepError, WaitCancelled
from .types import AdapterInfo, AdapterList, AudioResult, ModelList, Submitted, TaskStatus
from .waiting import Answer, OnUpdate, Waiting


class ACEStepClient:
    """Talks to this server or an upstream ACE-Step API server (`/release_task`, `/query_result`).

    >>> with ACEStepClient("http://127.0.0.1:8001") as client:
    ...     paths = client.generate_and_download("lofi piano", "out/", audio_duration=30)
    """

    def __init__(self, api_url: Optional[str] = None, api_key: Optional[str] = None, *,
                 timeout: float = 60.0, http: Optional[httpx.Client] = None):
        self.base_url, self.api_key = protocol.resolve(api_url, api_key)
        self._http = http or httpx.Client(timeout=timeout, follow_redirects=True)
        self._http.headers.update(protocol.client_headers(self.api_key, self._http.headers.get("User-Agent", "")))

    def __enter__(self) -> "ACEStepClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: protocol.Call) -> Any:
        try:
            request = self._http.build_request(call.method, call.url or self.base_url + call.path, **call.kwargs())
            if not call.with_key:
                request.headers.pop("Authorization", None)
            response = self._http.send(request)
        except httpx.TransportError as exc:
            raise protocol.unreachable(exc, self.base_url) from exc
        finally:
            protocol.close_files(call)
        return protocol.answer(response, call)

    # --- the API -------------------------------------------------------------------------------

    def submit(self, prompt: str = "", lyrics: str = "", *, src_audio: Optional[str] = None,
               reference_audio: Optional[str] = None, idempotency_key: Optional[str] = None,
               adapter: Optional[protocol.Names] = None, adapter_scale: Optional[protocol.Scales] = None,
               **fields: Any) -> Submitted:
        """POST /release_task with upstream's field names (`audio_duration`, `bpm`, `task_type`, ...).
        `src_audio`/`reference_audio` are local files, sent as multipart. `adapter`: a name from
        `list_adapters()` or a list of them (stacked); `adapter_scale`: one number, or one per adapter."""
        fields.update(protocol.adapter_fields(adapter, adapter_scale))
        call = protocol.submit_call({"prompt": prompt, "lyrics": lyrics, **fields}, src_audio, reference_audio,
                                    idempotency_key)
        data = self._send(call)
        return Submitted(str(data["task_id"]), data.get("queue_position"))

    def status(self, task_id: str) -> TaskStatus:
        return self.statuses([task_id])[0]

    def statuses(self, task_ids: list[str]) -> list[TaskStatus]:
        data = self._send(protocol.query_call(task_ids))
        return [TaskStatus.parse(entry) for entry in data or []]

    def models(self) -> ModelList:
        return ModelList.parse(self._send(protocol.models_call()))

    def list_adapters(self) -> AdapterList:
        """GET /v1/adapters: each adapter's kind, rank, size and the models it fits (`.fitting(model)`)."""
        return AdapterList.parse(self._send(protocol.adapters_call()))

    def upload_adapter(self, path: str, name: Optional[str] = None, *, model: Optional[str] = None,
                       replace: bool = False) -> AdapterInfo:
        """Upload a `.safetensors`, a `.zip` of a PEFT folder, or the folder itself (zipped here). The server
        checks it against `model` (default: its default model): APIError 400 saying why when it does not fit,
        409 when `name` (default: the file's) is another adapter's, unless `replace`."""
        filename, data = protocol.adapter_file(path)
        ticket = self._send(protocol.adapter_ticket_call(filename))
        self._send(protocol.adapter_put(self.base_url, ticket, data))
        stored = self._send(protocol.register_adapter_call(str(ticket["key"]), name, model, replace))
        return AdapterInfo.parse(stored.get("adapter"), created=bool(stored.get("created")))

    def delete_adapter(self, name: str) -> bool:
        """DELETE /v1/adapters/{name}: APIError 404 for an unknown name, 409 when it may not be deleted."""
        data = self._send(protocol.delete_adapter_call(name))
        return bool(data.get("deleted", True)) if isinstance(data, dict) else True

    def cancel(self, task_id: str) -> Any:
        """POST /v1/tasks/{id}/cancel; NotSupported when the server has no cancel route (upstream)."""
        return self._send(protocol.cancel_call(task_id))

    def wait(self, task_id: str, *, timeout: Optional[float] = 600.0, on_update: Optional[OnUpdate] = None,
             cancel: Optional[threading.Event] = None, poll_interval: float = 0.5,
             max_interval: float = 5.0, raise_on_failure: bool = True) -> TaskStatus:
        """Poll until the task finished. Backs off while nothing changes; transient errors (network,
        429, 502-504) are retried until `timeout`. Raises TaskFailed for a failed or cancelled task
        (unless `raise_on_failure` is False), WaitTimeout, or WaitCancelled once `cancel` is set.
        `on_update` hears of each visible change (state, queue position, stage, whole percent) and of
        the final status, not of every poll."""
        waiting = Waiting(task_id, timeout=timeout, on_update=on_update, raise_on_failure=raise_on_failure,
                          poll_interval=poll_interval, max_interval=max_interval)
        while cancel is None or not cancel.is_set():
            answer: Answer
            try:
                answer = self.status(task_id)
            except ACEStepError as exc:
                answer = exc
            outcome = waiting.step(answer)
            if isinstance(outcome, TaskStatus):
                return outcome
            if cancel is None:
                time.sleep(outcome)
            elif cancel.wait(outcome):
                break
        raise WaitCancelled(task_id)

    def download(self, audio: AudioResult, dest: str, task_id: str = "audio") -> str:
        """Stream one result file to `dest` (a directory, or a file name); returns the path written."""
        path = protocol.output_path(dest, task_id, audio.index, audio.extension)
        call = protocol.Call("GET", audio.file)
        try:
            with self._http.stream("GET", protocol.absolute(self.base_url, audio.file)) as response:
                if response.status_code >= 400:
                    response.read()
                    protocol.read(response, call)
                with protocol.landing(path) as out:  # a failed download leaves nothing behind
                    for chunk in response.iter_bytes():
                        out.write(chunk)
        except httpx.TransportError as exc:
            raise protocol.unreachable(exc, self.base_url) from exc
        return path

    def download_all(self, status: TaskStatus, dest: str) -> list[str]:
        return [self.download(audio, dest, status.task_id) for audio in status.audios]

    def generate_and_download(self, prompt: str, dest: str, *, lyrics: str = "", timeout: Optional[float] = 600.0,
                              on_update: Optional[OnUpdate] = None, cancel: Optional[threading.Event] = None,
                              **fields: Any) -> list[str]:
        """Submit, wait, download every file; returns the paths written."""
        task = self.submit(prompt, lyrics, **fields)
        status = self.wait(task.task_id, timeout=timeout, on_update=on_update, cancel=cancel)
        return self.download_all(status, dest)
