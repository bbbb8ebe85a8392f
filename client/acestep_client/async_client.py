"""AsyncACEStepClient: the same API as ACEStepClient on httpx.AsyncClient.

Cancelling the coroutine (asyncio task cancellation, asyncio.timeout) stops a wait; nothing else
is needed for cancellation here."""
from __future__ import annotations

import asyncio
from typing import Any, Optional

import httpx

from . import protocol
from .errors import ACEStepError
from .types import AdapterInfo, AdapterList, AudioResult, ModelList, Submitted, TaskStatus
from .waiting import Answer, OnUpdate, Waiting


class AsyncACEStepClient:
    def __init__(self, api_url: Optional[str] = None, api_key: Optional[str] = None, *,
                 timeout: float = 60.0, http: Optional[httpx.AsyncClient] = None):
        self.base_url, self.api_key = protocol.resolve(api_url, api_key)
        self._http = http or httpx.AsyncClient(timeout=timeout, follow_redirects=True)
        self._http.headers.update(protocol.client_headers(self.api_key, self._http.headers.get("User-Agent", "")))

    async def __aenter__(self) -> "AsyncACEStepClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: protocol.Call) -> Any:
        try:
            request = self._http.build_request(call.method, call.url or self.base_url + call.path, **call.kwargs())
            if not call.with_key:
                request.headers.pop("Authorization", None)
            response = await self._http.send(request)
        except httpx.TransportError as exc:
            raise protocol.unreachable(exc, self.base_url) from exc
        finally:
            protocol.close_files(call)
        return protocol.answer(response, call)

    async def submit(self, prompt: str = "", lyrics: str = "", *, src_audio: Optional[str] = None,
                     reference_audio: Optional[str] = None, idempotency_key: Optional[str] = None,
                     adapter: Optional[protocol.Names] = None, adapter_scale: Optional[protocol.Scales] = None,
                     **fields: Any) -> Submitted:
        fields.update(protocol.adapter_fields(adapter, adapter_scale))
        call = protocol.submit_call({"prompt": prompt, "lyrics": lyrics, **fields}, src_audio, reference_audio,
                                    idempotency_key)
        data = await self._send(call)
        return Submitted(str(data["task_id"]), data.get("queue_position"))

    async def status(self, task_id: str) -> TaskStatus:
        return (await self.statuses([task_id]))[0]

    async def statuses(self, task_ids: list[str]) -> list[TaskStatus]:
        data = await self._send(protocol.query_call(task_ids))
        return [TaskStatus.parse(entry) for entry in data or []]

    async def models(self) -> ModelList:
        return ModelList.parse(await self._send(protocol.models_call()))

    async def list_adapters(self) -> AdapterList:
        return AdapterList.parse(await self._send(protocol.adapters_call()))

    async def upload_adapter(self, path: str, name: Optional[str] = None, *, model: Optional[str] = None,
                             replace: bool = False) -> AdapterInfo:
        filename, data = protocol.adapter_file(path)
        ticket = await self._send(protocol.adapter_ticket_call(filename))
        await self._send(protocol.adapter_put(self.base_url, ticket, data))
        stored = await self._send(protocol.register_adapter_call(str(ticket["key"]), name, model, replace))
        return AdapterInfo.parse(stored.get("adapter"), created=bool(stored.get("created")))

    async def delete_adapter(self, name: str) -> bool:
        data = await self._send(protocol.delete_adapter_call(name))
        return bool(data.get("deleted", True)) if isinstance(data, dict) else True

    async def cancel(self, task_id: str) -> Any:
        return await self._send(protocol.cancel_call(task_id))

    async def wait(self, task_id: str, *, timeout: Optional[float] = 600.0, on_update: Optional[OnUpdate] = None,
                   poll_interval: float = 0.5, max_interval: float = 5.0,
                   raise_on_failure: bool = True) -> TaskStatus:
        waiting = Waiting(task_id, timeout=timeout, on_update=on_update, raise_on_failure=raise_on_failure,
                          poll_interval=poll_interval, max_interval=max_interval)
        while True:
            answer: Answer
            try:
                answer = await self.status(task_id)
            except ACEStepError as exc:
                answer = exc
            outcome = waiting.step(answer)
            if isinstance(outcome, TaskStatus):
                return outcome
            await asyncio.sleep(outcome)

    async def download(self, audio: AudioResult, dest: str, task_id: str = "audio") -> str:
        path = protocol.output_path(dest, task_id, audio.index, audio.extension)
        call = protocol.Call("GET", audio.file)
        try:
            async with self._http.stream("GET", protocol.absolute(self.base_url, audio.file)) as response:
                if response.status_code >= 400:
                    await response.aread()
                    protocol.read(response, call)
                with protocol.landing(path) as out:
                    async for chunk in response.aiter_bytes():
                        out.write(chunk)
        except httpx.TransportError as exc:
            raise protocol.unreachable(exc, self.base_url) from exc
        return path

    async def download_all(self, status: TaskStatus, dest: str) -> list[str]:
        return [await self.download(audio, dest, status.task_id) for audio in status.audios]

    async def generate_and_download(self, prompt: str, dest: str, *, lyrics: str = "",
                                    timeout: Optional[float] = 600.0, on_update: Optional[OnUpdate] = None,
                                    **fields: Any) -> list[str]:
        task = await self.submit(prompt, lyrics, **fields)
        status = await self.wait(task.task_id, timeout=timeout, on_update=on_update)
        return await self.download_all(status, dest)
