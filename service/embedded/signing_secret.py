"""The URL-signing secret of the embedded backend: a 0600 JSON file in the data dir (and, in a file
of its own, the webhook-signing secret: WEBHOOK_FILE_NAME).

Created on first use (atomically: several processes may start at once); `rotate` makes a new
current secret and keeps the old one accepted for the grace window.
    python -m service.embedded.signing_secret rotate ./data            # signed URLs
    python -m service.embedded.signing_secret rotate-webhook ./data    # webhook signatures
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from ..signing_keys import SigningKeys, new_secret

FILE_NAME = "signing-secret.json"
WEBHOOK_FILE_NAME = "webhook-secret.json"
DEFAULT_GRACE_SECONDS = 24 * 3600


class FileSigningSecret:
    def __init__(self, data_dir: str, grace_seconds: float = DEFAULT_GRACE_SECONDS, file_name: str = FILE_NAME):
        self.path = os.path.join(os.path.abspath(data_dir), file_name)
        self.grace_seconds = grace_seconds

    def load(self) -> SigningKeys:
        state = self._read()
        if state is None:
            self._create({"current": new_secret().hex(), "previous": []})
            state = self._read()
            assert state is not None
        now = time.time()
        previous = tuple(bytes.fromhex(p["key"]) for p in state.get("previous", [])
                         if now - float(p["retired_at"]) < self.grace_seconds)
        return SigningKeys(bytes.fromhex(state["current"]), previous)

    def rotate(self) -> None:
        """A new current secret; the old one is accepted for `grace_seconds` more."""
        self.load()  # make sure a file exists
        state = self._read() or {}
        now = time.time()
        kept = [p for p in state.get("previous", []) if now - float(p["retired_at"]) < self.grace_seconds]
        self._write({"current": new_secret().hex(),
                     "previous": [{"key": state["current"], "retired_at": now}, *kept]})

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path) as f:
                state = json.load(f)
        except FileNotFoundError:
            return None
        if not isinstance(state, dict):
            raise ValueError(f"{self.path}: the signing secret file holds no JSON object")
        return state

    def _create(self, state: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:  # O_EXCL: the first process to start writes it, the others read that one
            fd = os.open(self.path + ".new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            self._wait_for_file()
            return
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        try:
            os.link(self.path + ".new", self.path)  # fails if another process got there first
        except FileExistsError:
            pass
        finally:
            os.unlink(self.path + ".new")

    def _wait_for_file(self) -> None:
        deadline = time.monotonic() + 5
        while not os.path.exists(self.path):
            if time.monotonic() > deadline:  # a creator died half-way: take over
                os.unlink(self.path + ".new")
                self._create({"current": new_secret().hex(), "previous": []})
                return
            time.sleep(0.01)

    def _write(self, state: dict[str, Any]) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
        os.replace(tmp, self.path)


if __name__ == "__main__":  # python -m service.embedded.signing_secret rotate|rotate-webhook <data dir>
    commands = {"rotate": FILE_NAME, "rotate-webhook": WEBHOOK_FILE_NAME}
    if len(sys.argv) != 3 or sys.argv[1] not in commands:
        sys.exit("usage: python -m service.embedded.signing_secret rotate|rotate-webhook <data dir>")
    secret = FileSigningSecret(sys.argv[2], file_name=commands[sys.argv[1]])
    secret.rotate()
    print(f"rotated {secret.path}; the previous secret stays valid for 24 h")
