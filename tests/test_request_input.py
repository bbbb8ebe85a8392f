"""/release_task parsing is pure: a body in, a validated request plus its declared audio sources out.

The HTTP-level behaviour (every alias, every 400 text) is pinned in test_api_parsing.py; these
check the layer itself: no I/O while parsing, aliases resolved once before one pydantic validation,
upstream's newer fields refused unless at their default, and the idempotency key.
"""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from engine.request import DECLARED_SOURCES, GenerationRequest
from handlers.body import FilePart
from handlers.envelope import ApiError
from handlers.aliases import resolve
from handlers.fields import READ_AS, UPSTREAM_ONLY, StrictRequest
from handlers.request_parsing import parse_release_task, validate_canonical, validation_message
from handlers.routes_tasks import read_idempotency_key
from service.sources import SentFile, ServerPath, UploadKey
from tests.api_support import make_api


def _detail(fields, **kwargs) -> str:
    with pytest.raises(ApiError) as info:
        parse_release_task(fields, **kwargs)
    assert info.value.status_code == 400
    return info.value.detail


def test_every_request_field_is_read_strictly():
    # A new GenerationRequest field needs a reader, or pydantic's lax coercion would take it silently.
    inputs = set(GenerationRequest.model_fields) - {"src_audio_key", "reference_audio_key"}
    assert inputs <= set(READ_AS)


def test_sources_are_declared_not_read(tmp_path):
    """Parsing touches neither the file system nor a blob store: it only says where audio comes from."""
    missing = str(tmp_path / "nowhere.wav")
    parsed = parse_release_task({"task_type": "repaint", "ctxAudioPath": missing,
                                 "param_obj": {"ref_audio_key": "uploads/pending/not-checked-here"}})
    assert parsed.sources == (ServerPath("src_audio", missing, "ctxAudioPath (src_audio_path)"),
                              UploadKey("reference_audio", "uploads/pending/not-checked-here",
                                        "param_obj.ref_audio_key (reference_audio_key)"))
    # Audio sources are not request fields; submission writes the keys.
    assert parsed.request.src_audio_key is None and parsed.request.reference_audio_key is None


def test_file_beats_key_beats_path():
    files = {"ctx_audio": FilePart(b"RIFF", "a.wav", "audio/wav")}
    parsed = parse_release_task({"task_type": "cover", "src_audio_key": "k", "src_audio_path": "/p"}, files)
    assert [type(s) for s in parsed.sources] == [SentFile]
    assert parsed.sources[0].label == "ctx_audio" and parsed.sources[0].upload.data == b"RIFF"
    parsed = parse_release_task({"task_type": "cover", "src_audio_key": "", "src_audio_path": "/p"})
    assert parsed.sources == (ServerPath("src_audio", "/p", "src_audio_path"),)


def test_source_requirement_comes_from_declared_sources():
    assert "needs source audio" in _detail({"task_type": "cover"})
    assert parse_release_task({"task_type": "cover", "src_audio_path": "/x"}).request.task_type == "cover"
    # The engine contract: a stored request has its key; one being submitted may declare the source instead.
    with pytest.raises(ValidationError):
        GenerationRequest.model_validate({"task_type": "extract", "track_name": "drums"})
    GenerationRequest.model_validate({"task_type": "extract", "track_name": "drums"},
                                     context={DECLARED_SOURCES: {"src_audio"}})
    GenerationRequest(task_type="extract", track_name="drums", src_audio_key="uploads/t/src_audio.wav")


def test_model_names_are_data():
    assert parse_release_task({"model": "b"}, model_names=["a", "b"]).request.model == "b"
    assert _detail({"dit_model": "c"}, model_names=["a", "b"]) == "dit_model (model): unknown model 'c'; available: a, b"
    assert parse_release_task({"model": "anything"}).request.model == "anything"  # no list: any name


def test_all_errors_in_one_message_named_as_sent():
    detail = _detail({"bpm": "fast", "metadata": {"duration": 5}, "seed": "x"})
    assert detail.startswith("bpm: must be an integer (got 'fast'); "
                             "metadata.duration (audio_duration): must be between 10 and 600 (got 5); seed: ")


def test_format_is_use_format_or_the_audio_format():
    assert parse_release_task({"format": "yes"}).request.use_format is True
    req = parse_release_task({"param_obj": {"format": "FLAC"}}).request
    assert (req.audio_format, req.use_format) == ("flac", False)
    assert parse_release_task({"format": "wav", "metas": {"audio_format": "flac"}}).request.audio_format == "flac"
    assert _detail({"format": "ogg"}) == "format (audio_format): must be one of mp3, wav, flac, opus, aac, wav32 (got 'ogg')"


def test_empty_string_means_default_and_none_means_absent():
    req = parse_release_task({"inference_steps": "", "task_type": "", "bpm": None, "param_obj": {"bpm": 99}}).request
    assert (req.inference_steps, req.task_type, req.bpm) == (8, "text2music", 99)


def test_instrumental_fills_empty_lyrics_only():
    assert parse_release_task({"instrumental": "true"}).request.lyrics == "[Instrumental]"
    assert parse_release_task({"instrumental": True, "lyrics": "la"}).request.lyrics == "la"
    assert "instrumental" not in parse_release_task({"instrumental": True}).request.model_dump()


def test_validation_message_for_the_plain_request_model():
    with pytest.raises(ValidationError) as info:
        GenerationRequest(bpm=500)
    assert validation_message(info.value, GenerationRequest) == "bpm: must be between 30 and 300 (got 500)"


def test_aliases_resolve_to_canonical_names_with_their_origin():
    canonical = resolve({"caption": "x", "duration": None, "param_obj": '{"keyScale": "Am", "duration": 30}',
                         "metas": {"key": "C", "format": "flac"}, "meta": {"bpm": 90}})
    assert canonical.values == {"prompt": "x", "key_scale": "Am", "audio_duration": 30, "audio_format": "flac"}
    assert canonical.origins == {"prompt": ("caption",), "key_scale": ("param_obj", "keyScale"),
                                 "audio_duration": ("param_obj", "duration"), "audio_format": ("metas", "format")}
    # the input model is GenerationRequest plus the readers, so its dump is a stored request
    parsed = validate_canonical(canonical)
    assert GenerationRequest(**parsed.model_dump()) == GenerationRequest(prompt="x", key_scale="Am",
                                                                         audio_duration=30, audio_format="flac")


@pytest.mark.parametrize("name", sorted(UPSTREAM_ONLY))
def test_upstream_newer_fields_only_at_their_default(name):
    default = UPSTREAM_ONLY[name][0]
    assert name not in parse_release_task({name: default}).request.model_dump()  # accepted, not stored
    other = {str: "other", float: 0.25, int: 3, bool: True, dict: {"eta": 0.5}}[type(default)]
    detail = _detail({"param_obj": {name: other}})
    assert detail.startswith(f"param_obj.{name}: only upstream's default") and "(got" in detail, detail
    assert "pipeline" in detail.lower() or "engine" in detail  # says why
    assert StrictRequest.model_fields[name].exclude


@pytest.mark.parametrize("header,fields,expected", [
    (None, {}, None), ("abc-123", {}, "abc-123"), (None, {"idempotency_key": "k 1"}, "k 1"),
    ("from-header", {"idempotency_key": "from-body"}, "from-header"), ("x" * 128, {}, "x" * 128),
])
def test_idempotency_key_accepted(header, fields, expected):
    assert read_idempotency_key(header, fields) == expected


@pytest.mark.parametrize("header,fields,name", [
    ("", {}, "Idempotency-Key"), ("x" * 129, {}, "Idempotency-Key"), ("a\tb", {}, "Idempotency-Key"),
    (None, {"idempotency_key": ""}, "idempotency_key"), (None, {"idempotency_key": 7}, "idempotency_key"),
    (None, {"idempotency_key": "ключ"}, "idempotency_key"),
])
def test_idempotency_key_rejected(header, fields, name):
    with pytest.raises(ApiError) as info:
        read_idempotency_key(header, fields)
    assert info.value.status_code == 400 and info.value.detail.startswith(f"{name}: must be 1-128 printable ASCII")


def test_idempotency_key_reaches_submission(settings):
    api = make_api(settings)
    first = api.client.post("/release_task", json={"prompt": "x"}, headers={"Idempotency-Key": "k1"})
    again = api.client.post("/release_task", json={"prompt": "x", "idempotency_key": "k1"})
    assert first.status_code == again.status_code == 200
    assert first.json()["data"]["task_id"] == again.json()["data"]["task_id"]
    assert api.backend.store.counts()["total"] == 1
    r = api.client.post("/release_task", json={"prompt": "x"}, headers={"Idempotency-Key": "x" * 200})
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["detail"]


def test_lm_backend_mlx_is_refused_saying_why():
    assert parse_release_task({"lm_backend": "pt"}).request.lm_backend == "pt"  # as upstream: the loaded LM runs
    assert _detail({"metas": {"lm_backend": "MLX"}}).startswith("metas.lm_backend: mlx runs on Apple silicon only")
