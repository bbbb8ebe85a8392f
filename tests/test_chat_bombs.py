"""Hostile chat bodies: bounded, linear parsing, off the event loop both APIs share (issue 21, item 1).

`"<prompt>" * 32000` (250 KB) took 73 s in a lazy regex retried from every opening tag, on the
event loop: /health on the other port waited as long.
"""
from __future__ import annotations

import asyncio
import random
import re
import threading
import time

import pytest
from fastapi.testclient import TestClient

from entrypoints.bootstrap import build_openrouter_app
from handlers.app import create_app
from handlers.off_loop import INLINE_BYTES, PARSE_THREADS, parse_off_loop
from handlers.openrouter.messages import _ASCII_LOWER, find_tagged, parse_messages
from handlers.openrouter.schema import MAX_TEXT_CHARS, ChatMessage
from service.embedded import make_embedded_backend

BOMB = "<prompt>" * 32000  # 256,000 characters


@pytest.fixture
def chat(settings):
    backend = make_embedded_backend(settings)
    return TestClient(build_openrouter_app(settings, create_app(settings, backend)))


@pytest.mark.parametrize("content", [BOMB, [{"type": "text", "text": BOMB}]], ids=["string", "part"])
def test_a_message_far_beyond_a_caption_and_lyrics_is_refused_unparsed(chat, content):
    r = chat.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400, r.text
    assert f"at most {MAX_TEXT_CHARS} characters (got {len(BOMB)})" in r.json()["detail"]


def test_too_many_messages_or_parts_are_refused(chat):
    r = chat.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}] * 300})
    assert r.status_code == 400 and "at most 256" in r.text, r.text
    parts = [{"type": "text", "text": "x"}] * 17
    r = chat.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400 and "at most 16 content parts" in r.text, r.text


def _cpu_seconds(fn) -> float:
    """The least CPU time of this thread over three calls: the work done, not how busy the machine is."""
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        fn()
        best = min(best, time.thread_time() - started)
    return best


@pytest.mark.parametrize("unit", ["<prompt>", "<LYRICS>", "<prompt></lyrics>", "<lyrics><prompt>x"])
def test_tag_parsing_is_linear_at_the_size_limit(unit):
    """Adversarial text just under the limit parses in a few passes' work: ~30 times one linear pass
    over it (lower-casing), where the lazy regex took 30,000-70,000 times that (0.25-0.55 s)."""
    text = unit * (MAX_TEXT_CHARS // len(unit))
    messages = [ChatMessage(role="user", content=text)]
    parsing = _cpu_seconds(lambda: parse_messages(messages, max_audio_bytes=1))
    one_pass = _cpu_seconds(text.lower)
    assert parsing < 300 * one_pass + 0.002, (parsing, one_pass)


_OLD_TAG = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.DOTALL | re.IGNORECASE) for name in ("prompt", "lyrics")}


def test_linear_tag_search_finds_what_the_regex_found():
    """The scan replaces `<name>(.*?)</name>` (DOTALL, IGNORECASE): same match on any mix of tags."""
    pieces = ["<prompt>", "</prompt>", "<PROMPT>", "</Prompt>", "<lyrics>", "</lyrics>", "<LyRiCs>", "a", "\n", " ",
              "<", ">", "/", "İ"]
    rng = random.Random(21)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        lowered = text.translate(_ASCII_LOWER)
        for name, rx in _OLD_TAG.items():
            match = rx.search(text)
            assert find_tagged(text, lowered, name) == (match.span() if match else None), (text, name)


def test_tagged_and_untagged_messages_still_parse_as_before():
    got = parse_messages([ChatMessage(role="user", content="<PROMPT>jazz</PROMPT> warm <lyrics>[Verse]\nla</lyrics>")], 1)
    assert (got.prompt, got.lyrics, got.tagged) == ("jazz warm", "[Verse]\nla", True)
    got = parse_messages([ChatMessage(role="user", content="a calm piano piece")], 1)
    assert (got.sample_query, got.prompt, got.lyrics) == ("a calm piano piece", "", "")


def test_big_inputs_parse_on_a_few_threads_and_small_ones_inline():
    running, peak, lock = [0], [0], threading.Lock()

    def work() -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)  # hold the thread a moment so the calls overlap
        with lock:
            running[0] -= 1
        return threading.get_ident()

    async def main():
        loop_thread = threading.get_ident()
        small = await parse_off_loop(INLINE_BYTES - 1, threading.get_ident)
        big = await asyncio.gather(*(parse_off_loop(INLINE_BYTES, work) for _ in range(3 * PARSE_THREADS)))
        return loop_thread, small, big

    loop_thread, small, big = asyncio.run(main())
    assert small == loop_thread
    assert loop_thread not in big and 1 <= peak[0] <= PARSE_THREADS, peak
