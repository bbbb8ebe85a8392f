"""The Studio (/studio) in real headless Chromium against the live demo servers: open, submit, follow
queue position and progress, play, download, repaint a region selected on the waveform, auth on and
off, a caption carrying markup shown as text, and adapters (upload, the server's 400, pick, scale, stack). One browser for the module, a fresh context (empty
localStorage) per test. Screenshots go to test-artifacts/studio/ (gitignored)."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import soundfile as sf

from engine.adapter_manifest import ModelShape
from tests.demo_servers import API_KEY
from tests.live_server import REPO, poll_until

pytestmark = pytest.mark.slow

SHOTS = Path(REPO) / "test-artifacts" / "studio"
INSTALL_LOG = Path(REPO) / ".venv" / ".chromium-install.log"  # written by `make browser`
INJECTION = '<img src=x onerror="window.__pwned=1"><b>bold</b> & "quotes"'
# Every text the task cards showed, in order (the page polls once a second; this sees each change).
RECORD_STAGES = """
window.__stages = [];
new MutationObserver(() => {
  for (const el of document.querySelectorAll('.task .stage')) {
    const t = el.textContent;
    if (t && window.__stages[window.__stages.length - 1] !== t) window.__stages.push(t);
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def _chromium() -> str:
    path = os.environ.get("ACESTEP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    why = INSTALL_LOG.read_text(errors="replace").strip().splitlines()[-3:] if INSTALL_LOG.exists() else []
    pytest.skip("no Chromium: `make browser` could not install Debian's chromium"
                + (": " + " | ".join(why) if why else " (not run; run `make browser` as root)"))


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="python playwright is in the dev extras")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable,
                                      args=["--autoplay-policy=no-user-gesture-required", "--mute-audio"])
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser):
    """open_page(server, key=None): a fresh page on the server's Studio, the key pre-saved if given."""
    contexts = []

    def _open(server, key=None):
        context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(60_000)
        if key:
            page.add_init_script(f"localStorage.setItem('acestep.studio.apiKey', {json.dumps(key)})")
        page.add_init_script(RECORD_STAGES)
        page.goto(server.base_url + "/studio")
        return page

    yield _open
    for context in contexts:
        context.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def fill_form(page, caption: str, **fields: str) -> None:
    page.fill("textarea[name=prompt]", caption)
    for name, value in fields.items():
        selector = f"[name={name}]"
        if page.locator(selector).evaluate("e => e.tagName") == "SELECT":
            page.select_option(selector, value)
        else:
            page.fill(selector, value)


def wait_js(page, expression: str, timeout: float = 30.0):
    """Until `expression` is truthy in the page (page.wait_for_function would need 'unsafe-eval', which the
    Studio's Content-Security-Policy forbids; page.evaluate is not subject to it)."""
    return poll_until(expression, lambda: page.evaluate(expression), timeout)


def zero_lora(shape: ModelShape, rank: int = 2) -> bytes:
    """A PEFT LoRA (.safetensors, zero weights) on the self-attention q/v of every layer of a DiT of `shape`."""
    header: dict = {}
    offset = 0
    for layer in range(shape.num_hidden_layers):
        for proj in ("q_proj", "v_proj"):
            out_f, in_f = shape.linear("self_attn", proj)
            for param, dims in (("lora_A", [rank, in_f]), ("lora_B", [out_f, rank])):
                size = dims[0] * dims[1] * 4
                header[f"base_model.model.layers.{layer}.self_attn.{proj}.{param}.weight"] = {
                    "dtype": "F32", "shape": dims, "data_offsets": [offset, offset + size]}
                offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + bytes(offset)


def served_shape(demo_root: Path) -> ModelShape:
    """The geometry of the demo servers' tiny random-weight DiT (its diffusers config)."""
    config = next(p for p in (demo_root / "checkpoints").rglob("config.json") if p.parent.name == "transformer")
    return ModelShape.from_config(json.loads(config.read_text()))


def wait_state(page, index: int, state: str) -> None:
    """Until the index-th card (0 = newest) shows `state` (or failed, which the assert then names)."""
    card = page.locator("#task-list .task").nth(index)
    card.and_(page.locator(f"[data-state={state}], [data-state=failed]")).wait_for()
    assert card.get_attribute("data-state") == state, card.locator(".task-error").text_content()


def test_auth_on_says_so_then_generates_follows_progress_plays_and_downloads(keyed_server, open_page):
    page = open_page(keyed_server)
    banner = page.locator("#auth-message")
    banner.wait_for()
    assert "needs an API key" in banner.text_content() and "Missing Authorization header" in banner.text_content()
    page.fill("#api-key", API_KEY)
    page.click("#settings button")
    page.locator("#model-select option[value=acestep-v15-turbo]").wait_for(state="attached")
    assert banner.is_hidden()
    assert page.locator("#demo-warning").is_visible()

    # two tasks: the second waits behind the first, so the page shows a queue position, then progress
    fill_form(page, INJECTION, audio_duration="10", batch_size="1", inference_steps="2", audio_format="wav",
              seed="7")
    page.fill("textarea[name=lyrics]", "[verse]\n<script>window.__pwned=2</script>")
    page.click("#submit")
    page.locator("#task-list .task").nth(0).wait_for()
    page.fill("[name=seed]", "8")
    page.click("#submit")
    page.locator("#task-list .task").nth(1).wait_for()
    wait_state(page, 0, "succeeded")
    wait_state(page, 1, "succeeded")
    stages = page.evaluate("window.__stages")
    assert any(re.fullmatch(r"queued, position \d+", s) for s in stages), stages
    assert any(re.search(r" · \d+%$", s) for s in stages), stages  # running: stage and percent

    first = page.locator("#task-list .task").nth(1)  # the older task is below the newer one
    assert first.locator(".task-title").text_content() == INJECTION  # markup shown as text
    assert page.locator(".task-title img, .task-title b").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert "seed 7" in first.locator(".metas").text_content()

    first.locator(".waveform").locator("div").first.wait_for()  # wavesurfer drew it
    first.locator(".play").click()
    wait_js(page, "document.querySelectorAll('.result audio')[1].currentTime > 0.2")
    first.locator(".play").click()
    shot(page, "generated")

    with page.expect_download() as caught:
        first.locator(".download").click()
    download = caught.value
    task_id = first.locator(".task-id").text_content()
    name = download.suggested_filename  # the server's Content-Disposition name wins over the link's
    assert name.startswith(task_id) and name.endswith(".wav"), name
    audio, rate = sf.read(download.path())
    assert rate == 48000 and len(audio) >= 9 * rate

    page.reload()  # the key and the history live in localStorage; results come back with fresh URLs
    page.locator("#task-list .task .result audio").nth(1).wait_for(state="attached")
    assert page.locator("#task-list .task[data-state=succeeded]").count() == 2
    assert page.locator("#auth-message").is_hidden()


def test_auth_off_repaint_a_region_selected_on_the_waveform(open_server, open_page):
    page = open_page(open_server)
    page.locator("#model-select option[value=acestep-v15-turbo]").wait_for(state="attached")
    fill_form(page, "ambient pads", audio_duration="10", batch_size="1", inference_steps="2", audio_format="wav")
    page.click("#submit")
    wait_state(page, 0, "succeeded")
    assert page.locator("#auth-message").is_hidden()

    wave = page.locator(".result .waveform").first
    wave.locator("div").first.wait_for()
    wait_js(page, "document.querySelector('.result audio').duration > 9")
    box = wave.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 0.2 * box["width"], y)
    page.mouse.down()
    page.mouse.move(box["x"] + 0.4 * box["width"], y, steps=5)
    page.mouse.move(box["x"] + 0.6 * box["width"], y, steps=5)
    page.mouse.up()
    selection = page.locator(".result .selection").first
    assert re.fullmatch(r"selected \d+\.\d\d–\d+\.\d\d s", selection.text_content())
    page.locator(".repaint-selection").first.click()
    assert page.locator("#task-type").input_value() == "repaint"
    start = float(page.input_value("[name=repainting_start]"))
    end = float(page.input_value("[name=repainting_end]"))
    assert 1.0 < start < 3.0 and 5.0 < end < 7.5, (start, end)  # 20%..60% of 10 s

    with page.expect_request("**/release_task") as sent:
        page.click("#submit")
    body = json.loads(sent.value.post_data)
    assert body["task_type"] == "repaint" and body["src_audio_path"].startswith("/v1/audio?path=")  # copied server-side
    assert (body["repainting_start"], body["repainting_end"]) == (start, end)
    page.locator("#task-list .task").nth(1).wait_for()  # the repaint's card is on top
    wait_state(page, 0, "succeeded")
    assert page.locator("#task-list .task").nth(0).locator(".task-title").text_content() == "repaint: ambient pads"
    shot(page, "repainted")


# Each flow below opens its own page (its own history) and has its own time budget.
def _studio_ready(server, open_page):
    page = open_page(server)
    page.locator("#model-select option").first.wait_for(state="attached")
    return page


def test_refused_tasks_show_the_servers_words(open_server, open_page):
    page = _studio_ready(open_server, open_page)
    fill_form(page, "x", bpm="5")
    page.click("#submit")
    error = page.locator("#submit-error")
    error.wait_for()
    assert error.text_content().startswith("400: ") and "bpm" in error.text_content()
    page.select_option("#task-type", "cover")
    page.fill("[name=bpm]", "")
    page.click("#submit")
    wait_js(page, "document.querySelector('#submit-error').textContent.includes('needs source audio')")


def test_cancelled_and_failed_tasks_say_why_on_their_cards(open_server, open_page):
    page = _studio_ready(open_server, open_page)
    # a long task, cancelled from its card while it waits or runs
    page.select_option("#task-type", "text2music")
    fill_form(page, "long", audio_duration="120", batch_size="4", inference_steps="50")
    page.click("#submit")
    page.locator("#task-list .task .cancel:visible").first.click()
    wait_state(page, 0, "cancelled")
    assert page.locator("#task-list .task").nth(0).locator(".task-error").text_content() == "cancelled by the client"

    # an uploaded file that is not audio: the task fails, and the card says why in the server's words
    page.select_option("#task-type", "cover")
    page.set_input_files("#source-file", files=[{"name": "notes.wav", "mimeType": "audio/wav",
                                                  "buffer": b"<b>not audio</b>"}])
    page.click("#submit")
    page.locator("#task-list .task").nth(1).wait_for()
    wait_state(page, 0, "failed")
    card = page.locator("#task-list .task").nth(0)
    assert card.locator(".task-title").text_content() == "cover: long"
    assert card.locator(".task-error").text_content().startswith("could not decode src_audio")


def test_adapters_are_uploaded_picked_and_sent_with_the_task(open_server, open_page, demo_root):
    # adapters: a file that is no adapter is refused in the server's words; one that fits the served model is
    # listed, picked, scaled and sent with the task, which the worker runs with it. An adapter that fits another
    # model only (added to the server's listing here: the demo serves one model) is shown but cannot be picked.
    def with_misfit(route):
        if route.request.method != "GET":
            return route.continue_()
        response = route.fetch()
        body = response.json()
        body["data"]["adapters"].append({"name": "other-style", "type": "lokr", "rank": 8,
                                         "fits_models": ["another-model"]})
        return route.fulfill(response=response, json=body)

    page = open_page(open_server)
    page.route("**/v1/adapters", with_misfit)
    page.locator("#model-select option").first.wait_for(state="attached")
    fill_form(page, "styled", audio_duration="10", batch_size="1", inference_steps="2")
    page.set_input_files("#adapter-file", files=[{"name": "junk.safetensors", "mimeType": "application/octet-stream",
                                                   "buffer": b"<b>no adapter</b>"}])
    page.click("#adapter-upload")
    wait_js(page, "document.querySelector('#adapter-error').textContent.startsWith('400: ')")
    assert "not a safetensors file" in page.text_content("#adapter-error")
    page.set_input_files("#adapter-file", files=[{"name": "tiny-style.safetensors", "mimeType": "application/octet-stream",
                                                   "buffer": zero_lora(served_shape(demo_root))}])
    page.click("#adapter-upload")
    wait_js(page, "document.querySelector('.adapter-pick').value === 'tiny-style'")
    assert page.text_content("#adapter-error") == ""
    picker = page.locator(".adapter-row .adapter-pick").first
    assert picker.locator("option[value=tiny-style]").text_content() == "tiny-style · lora r2 · fits acestep-v15-turbo"
    assert picker.locator("option[value=other-style]").is_disabled()
    page.fill(".adapter-row .adapter-scale", "0.5")
    page.click("#add-adapter")  # a second row to stack on; left empty, it sends nothing
    assert page.locator(".adapter-row").count() == 2
    with page.expect_request("**/release_task") as sent:
        page.click("#submit")
    body = json.loads(sent.value.post_data)
    assert (body["adapter"], body["adapter_scale"]) == ("tiny-style", 0.5)
    page.locator("#task-list .task").nth(0).wait_for()  # accepted: the server found it and it fits
    shot(page, "adapter")
    page.locator("#task-list .task .cancel:visible").first.click()  # the worker's side is tested without a browser
    wait_state(page, 0, "cancelled")
