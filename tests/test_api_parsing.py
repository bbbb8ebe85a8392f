"""/release_task parsing: every alias and source, body forms, strict coercion, 400/413/415 messages."""
from __future__ import annotations

import json
from urllib.parse import urlencode

import pytest

from tests.api_support import make_api


@pytest.fixture
def api(settings, tmp_path):
    return make_api(settings, allowed_audio_dirs=[str(tmp_path / "allowed")])


# (field as sent, value sent, canonical field, value stored)
ALIASES = [
    ("prompt", "p", "prompt", "p"), ("caption", "p", "prompt", "p"),
    ("lyrics", "la la", "lyrics", "la la"),
    ("audio_duration", 30, "audio_duration", 30.0), ("duration", 30, "audio_duration", 30.0),
    ("audioDuration", "30", "audio_duration", 30.0), ("target_duration", 30.5, "audio_duration", 30.5),
    ("targetDuration", 30, "audio_duration", 30.0),
    ("key_scale", "C major", "key_scale", "C major"), ("keyscale", "C major", "key_scale", "C major"),
    ("keyScale", "Am", "key_scale", "Am"), ("key", "Am", "key_scale", "Am"),
    ("time_signature", "3", "time_signature", "3"), ("timesignature", 4, "time_signature", "4"),
    ("timeSignature", "6", "time_signature", "6"),
    ("vocal_language", "ko", "vocal_language", "ko"), ("vocalLanguage", "ja", "vocal_language", "ja"),
    ("language", "zh", "vocal_language", "zh"),
    ("model", "acestep-v15-turbo", "model", "acestep-v15-turbo"),
    ("model_name", "acestep-v15-turbo", "model", "acestep-v15-turbo"),
    ("modelName", "acestep-v15-turbo", "model", "acestep-v15-turbo"),
    ("dit_model", "acestep-v15-turbo", "model", "acestep-v15-turbo"),
    ("ditModel", "acestep-v15-turbo", "model", "acestep-v15-turbo"),
    ("sample_query", "q", "sample_query", "q"), ("sampleQuery", "q", "sample_query", "q"),
    ("description", "q", "sample_query", "q"), ("desc", "q", "sample_query", "q"),
    ("sample_mode", True, "sample_mode", True), ("sampleMode", "yes", "sample_mode", True),
    ("use_format", True, "use_format", True), ("useFormat", "on", "use_format", True),
    ("format", "true", "use_format", True),
    ("thinking", True, "thinking", True), ("think", True, "thinking", True),
    ("inference_steps", 12, "inference_steps", 12), ("inferenceSteps", "12", "inference_steps", 12),
    ("guidance_scale", 5, "guidance_scale", 5.0), ("guidanceScale", "4.5", "guidance_scale", 4.5),
    ("use_random_seed", False, "use_random_seed", False), ("useRandomSeed", "0", "use_random_seed", False),
    ("task_type", "text2music", "task_type", "text2music"), ("taskType", "TEXT2MUSIC", "task_type", "text2music"),
    ("audio_cover_strength", 0.5, "audio_cover_strength", 0.5),
    ("audioCoverStrength", "0.25", "audio_cover_strength", 0.25),
    ("analysis_only", True, "analysis_only", True), ("analysisOnly", 1, "analysis_only", True),
    ("full_analysis_only", "true", "full_analysis_only", True),
    ("fullAnalysisOnly", True, "full_analysis_only", True),
    ("infer_method", "sde", "infer_method", "sde"), ("inferMethod", "SDE", "infer_method", "sde"),
    ("use_tiled_decode", False, "use_tiled_decode", False), ("useTiledDecode", "off", "use_tiled_decode", False),
    ("constrained_decoding", False, "constrained_decoding", False),
    ("constrainedDecoding", "no", "constrained_decoding", False),
    ("constrained", "0", "constrained_decoding", False),
    ("use_cot_caption", False, "use_cot_caption", False), ("cot_caption", "false", "use_cot_caption", False),
    ("use_cot_language", False, "use_cot_language", False), ("cot_language", "no", "use_cot_language", False),
    ("is_format_caption", True, "is_format_caption", True), ("isFormatCaption", "1", "is_format_caption", True),
    ("allow_lm_batch", False, "allow_lm_batch", False), ("allowLmBatch", "false", "allow_lm_batch", False),
    ("parallel_thinking", False, "allow_lm_batch", False),
    ("audio_code_string", "1,2,3", "audio_code_string", "<|audio_code_1|><|audio_code_2|><|audio_code_3|>"),
    ("audioCodeString", "<|audio_code_5|>", "audio_code_string", "<|audio_code_5|>"),
    ("bpm", "120", "bpm", 120), ("bpm", 120.0, "bpm", 120),
    ("batch_size", 3, "batch_size", 3), ("audio_format", "WAV", "audio_format", "wav"),
    ("shift", 2, "shift", 2.0), ("cfg_interval_start", 0.1, "cfg_interval_start", 0.1),
    ("cfg_interval_end", 0.9, "cfg_interval_end", 0.9), ("use_adg", True, "use_adg", True),
    ("lm_temperature", 0.5, "lm_temperature", 0.5), ("lm_cfg_scale", 3, "lm_cfg_scale", 3.0),
    ("lm_top_k", 40, "lm_top_k", 40), ("lm_top_p", 0.8, "lm_top_p", 0.8),
    ("lm_repetition_penalty", 1.1, "lm_repetition_penalty", 1.1),
    ("lm_negative_prompt", "bad", "lm_negative_prompt", "bad"), ("lm_backend", "PT", "lm_backend", "pt"),
    ("lm_model_path", "acestep-5Hz-lm-0.6B", "lm_model_path", "acestep-5Hz-lm-0.6B"),
    ("instruction", "Do it", "instruction", "Do it"),
    ("timesteps", "0.9,0.5,0.1", "timesteps", [0.9, 0.5, 0.1]), ("timesteps", [1.0, 0.5], "timesteps", [1.0, 0.5]),
    ("seed", 42, "seeds", [42]), ("seed", "1,2,3", "seeds", [1, 2, 3]), ("seed", -1, "seeds", None),
    ("seed", "7, -1", "seeds", [7, -1]), ("seed", [5, 6], "seeds", [5, 6]),
    ("repainting_start", 1.5, "repainting_start", 1.5),
]


@pytest.mark.parametrize("sent,value,canonical,stored", ALIASES, ids=[f"{a[0]}={a[1]!r}" for a in ALIASES])
def test_top_level_alias(api, sent, value, canonical, stored):
    if canonical == "full_analysis_only":  # analysing needs a source: send one with the flag
        r = api.client.post("/release_task", data={sent: str(value).lower()},
                            files={"src_audio": ("song.wav", b"RIFFfake", "audio/wav")}, headers=api.headers())
        assert r.status_code == 200, r.text
        task_id = r.json()["data"]["task_id"]
    else:
        task_id = api.submit(**{sent: value})
    assert api.stored_request(task_id)[canonical] == stored


@pytest.mark.parametrize("source", ["param_obj", "metas", "meta", "metadata", "user_metadata", "userMetadata"])
@pytest.mark.parametrize("as_string", [False, True])
def test_extra_sources(api, source, as_string):
    extra = {"bpm": 91, "duration": 33, "keyscale": "D minor", "language": "fr", "caption": "from extra"}
    task_id = api.submit(**{source: json.dumps(extra) if as_string else extra})
    req = api.stored_request(task_id)
    assert (req["bpm"], req["audio_duration"], req["key_scale"], req["vocal_language"], req["prompt"]) == \
        (91, 33.0, "D minor", "fr", "from extra")


def test_source_precedence_top_then_param_obj_then_metas(api):
    task_id = api.submit(bpm=100, param_obj={"bpm": 110, "duration": 40}, metas={"bpm": 120, "duration": 50,
                                                                                 "keyscale": "E major"})
    req = api.stored_request(task_id)
    assert (req["bpm"], req["audio_duration"], req["key_scale"]) == (100, 40.0, "E major")


def test_first_truthy_metas_source_wins(api):
    task_id = api.submit(metas={}, meta=None, metadata={"bpm": 77}, user_metadata={"bpm": 88})
    assert api.stored_request(task_id)["bpm"] == 77


def test_alias_order_within_a_source(api):
    task_id = api.submit(prompt="first", caption="second", audio_duration=20, duration=30)
    req = api.stored_request(task_id)
    assert (req["prompt"], req["audio_duration"]) == ("first", 20.0)


def test_unknown_fields_ignored_and_format_mp3_means_audio_format(api):
    task_id = api.submit(prompt="x", some_client_field={"a": 1}, format="wav", lm_something=3)
    req = api.stored_request(task_id)
    assert req["audio_format"] == "wav" and req["use_format"] is False


def test_random_sample_outputs_feed_back(api):
    for sample_type in ("simple_mode", "custom_mode"):
        for _ in range(5):
            sample = api.client.post("/create_random_sample", json={"sample_type": sample_type}).json()["data"]
            task_id = api.submit(**sample)
            req = api.stored_request(task_id)
            if sample_type == "simple_mode":
                assert req["sample_query"] == sample["description"]
                assert req["vocal_language"] == sample["vocal_language"]
                if sample["instrumental"]:
                    assert req["lyrics"] == "[Instrumental]"
            else:
                assert req["thinking"] is True and req["prompt"] == sample["caption"]
                assert req["bpm"] == sample["bpm"] and req["audio_duration"] == sample["duration"]
                assert req["key_scale"] == sample["keyscale"] and req["time_signature"] == sample["timesignature"]


# --- body forms ---------------------------------------------------------------------------------

FORM = {"caption": "lofi", "bpm": "95", "thinking": "true", "duration": "25", "seed": "3,4",
        "batch_size": "2", "param_obj": json.dumps({"keyscale": "F major"}), "metas": json.dumps({"language": "es"})}


def _check_form(api, r):
    assert r.status_code == 200, r.text
    req = api.stored_request(r.json()["data"]["task_id"])
    assert (req["prompt"], req["bpm"], req["thinking"], req["audio_duration"], req["seeds"], req["key_scale"],
            req["vocal_language"]) == ("lofi", 95, True, 25.0, [3, 4], "F major", "es")


def test_urlencoded(api):
    _check_form(api, api.client.post("/release_task", data=FORM))


def test_multipart_fields_only(api):
    _check_form(api, api.client.post("/release_task", data=FORM, files={"unused": ("", b"")}))


def test_raw_query_string_without_content_type(api):
    _check_form(api, api.client.post("/release_task", content=urlencode(FORM).encode(),
                                     headers={"Content-Type": ""}))


def test_raw_json_with_text_plain(api):
    _check_form(api, api.client.post("/release_task", content=json.dumps(FORM).encode(),
                                     headers={"Content-Type": "text/plain"}))


def test_json_with_charset_and_plus_json(api):
    for ct in ("application/json; charset=utf-8", "application/vnd.api+json"):
        _check_form(api, api.client.post("/release_task", content=json.dumps(FORM).encode(),
                                         headers={"Content-Type": ct}))


@pytest.mark.parametrize("field,role", [("src_audio", "src_audio"), ("ctx_audio", "src_audio"),
                                        ("reference_audio", "reference_audio"), ("ref_audio", "reference_audio")])
def test_multipart_file_fields(api, field, role):
    task_type = "cover" if role == "src_audio" else "text2music"
    r = api.client.post("/release_task", data={"prompt": "remix", "task_type": task_type, "thinking": "true"},
                        files={field: ("song.wav", b"RIFFfake", "audio/wav")})
    assert r.status_code == 200, r.text
    task_id = r.json()["data"]["task_id"]
    req = api.stored_request(task_id)
    key = req[f"{role}_key"]
    assert key.startswith(f"uploads/{task_id}/") and api.backend.blobs.get(key) == b"RIFFfake"
    assert key in api.backend.store.get(task_id).blob_keys


def test_multipart_file_wins_over_path_field(api):
    r = api.client.post("/release_task", data={"task_type": "cover", "src_audio_path": "/etc/passwd"},
                        files={"src_audio": ("a.mp3", b"ID3data", "audio/mpeg")})
    assert r.status_code == 200, r.text


# --- server paths and upload keys -----------------------------------------------------------------

def test_server_path_outside_allowed_dirs_is_rejected(api, tmp_path):
    outside = tmp_path / "outside.wav"
    outside.write_bytes(b"x")
    for name in ("src_audio_path", "ctx_audio_path", "sourceAudioPath", "srcAudioPath", "ctxAudioPath"):
        r = api.client.post("/release_task", json={"task_type": "cover", name: str(outside)})
        assert r.status_code == 400 and name in r.json()["detail"] and "upload" in r.json()["detail"], r.text
    r = api.client.post("/release_task", json={"reference_audio_path": "/etc/passwd"})
    assert r.status_code == 400 and "reference_audio_path" in r.json()["detail"]
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    r = api.client.post("/release_task", json={"task_type": "cover",
                                               "src_audio_path": str(allowed / ".." / "outside.wav")})
    assert r.status_code == 400


def test_server_path_inside_allowed_dir_is_read(api, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "in.wav").write_bytes(b"RIFFinside")
    for name in ("reference_audio_path", "ref_audio_path", "referenceAudioPath", "refAudioPath"):
        task_id = api.submit(**{name: str(allowed / "in.wav")})
        key = api.stored_request(task_id)["reference_audio_key"]
        assert api.backend.blobs.get(key) == b"RIFFinside"
    r = api.client.post("/release_task", json={"task_type": "cover", "src_audio_path": str(allowed / "nope.wav")})
    assert r.status_code == 400 and "not found" in r.json()["detail"]


def test_symlink_escape_is_rejected(api, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "secret.wav").write_bytes(b"secret")
    (allowed / "link.wav").symlink_to(tmp_path / "secret.wav")
    r = api.client.post("/release_task", json={"task_type": "cover", "src_audio_path": str(allowed / "link.wav")})
    assert r.status_code == 400


def test_bad_upload_keys(api):
    for key in ("outputs/x/0-0.mp3", "uploads/pending/../../etc", "/etc/passwd",
                "uploads/pending/0123456789abcdef0123456789abcdef/missing.wav"):
        r = api.client.post("/release_task", json={"task_type": "cover", "src_audio_key": key})
        assert r.status_code == 400 and "src_audio_key" in r.json()["detail"], (key, r.text)


# --- errors ---------------------------------------------------------------------------------------

RANGE_ERRORS = [
    ({"bpm": 500}, "bpm", "between 30 and 300", "500"),
    ({"bpm": 10}, "bpm", "between 30 and 300", "10"),
    ({"duration": 5}, "audio_duration", "between 10 and 600", "5"),
    ({"audio_duration": 601}, "audio_duration", "between 10 and 600", "601"),
    ({"batch_size": 9}, "batch_size", "between 1 and 8", "9"),
    ({"batch_size": 0}, "batch_size", "between 1 and 8", "0"),
    ({"inference_steps": 0}, "inference_steps", "between 1 and 200", "0"),
    ({"inference_steps": 500}, "inference_steps", "between 1 and 200", "500"),
    ({"guidance_scale": 31}, "guidance_scale", "between 0 and 30", "31"),
    ({"shift": 9}, "shift", "between 1 and 5", "9"),
    ({"audio_format": "ogg"}, "audio_format", "mp3, wav, flac", "ogg"),
    ({"task_type": "karaoke"}, "task_type", "text2music, cover, repaint", "karaoke"),
    ({"audio_cover_strength": 1.5}, "audio_cover_strength", "between 0 and 1", "1.5"),
    ({"audioCoverStrength": -0.1}, "audio_cover_strength", "between 0 and 1", "-0.1"),
    ({"repainting_start": 700}, "repainting_start", "between -600 and 600", "700"),
    ({"repainting_start": 20, "repainting_end": 10}, "repainting_end", "greater than repainting_start", ""),
    ({"seed": "abc"}, "seed", "0-4294967295", "abc"),
    ({"audio_code_string": "1 " * 3001}, "audio_code_string", "at most 3000 codes", ""),
    ({"lm_negative_prompt": "x" * 5000}, "lm_negative_prompt", "4096", ""),
    ({"seed": -5}, "seed", "-1 for random", "-5"),
    ({"seed": 2**32}, "seed", "0-4294967295", ""),
    ({"timesteps": "0.5,0.9"}, "timesteps", "decreasing", ""),
    ({"timesteps": "a,b"}, "timesteps", "number", ""),
    ({"timesteps": [2.0]}, "timesteps", "(0, 1]", ""),
    ({"audio_code_string": "hello"}, "audio_code_string", "audio_code_N", ""),
    ({"audio_code_string": "70000"}, "audio_code_string", "0-63999", ""),
    ({"lm_temperature": 3}, "lm_temperature", "between 0 and 2", "3"),
    ({"lm_top_p": 1.5}, "lm_top_p", "between 0 and 1", "1.5"),
    ({"infer_method": "euler"}, "infer_method", "ode, sde", "euler"),
    ({"lm_backend": "tensorrt"}, "lm_backend", "vllm, pt, mlx", "tensorrt"),
    ({"time_signature": "5"}, "time_signature", "2, 3, 4, 6", "5"),
    ({"cfg_interval_start": 0.8, "cfg_interval_end": 0.2}, "cfg_interval_start", "<=", ""),
    ({"model": "nope"}, "model", "available: acestep-v15-turbo", ""),
    ({"bpm": "abc"}, "bpm", "integer", "abc"),
    ({"bpm": "120.5"}, "bpm", "integer", "120.5"),
    ({"bpm": True}, "bpm", "integer", ""),
    ({"inference_steps": 8.5}, "inference_steps", "integer", "8.5"),
    ({"guidance_scale": "lots"}, "guidance_scale", "number", "lots"),
    ({"thinking": "maybe"}, "thinking", "true/false", "maybe"),
    ({"prompt": ["a", "b"]}, "prompt", "string", ""),
    ({"param_obj": "{not json"}, "param_obj", "JSON object", ""),
    ({"metas": [1, 2]}, "metas", "JSON object", ""),
    ({"task_type": "cover"}, "cover", "source audio", ""),
    ({"task_type": "extract", "src_audio_key": None}, "extract", "source audio", ""),
    ({"complete_track_classes": "drums,kazoo"}, "complete_track_classes", "kazoo", ""),
    ({"track_name": "kazoo"}, "track_name", "must be one of", ""),
    ({"prompt": "x" * 5000}, "prompt", "4096", ""),
]


@pytest.mark.parametrize("payload,field,allowed,got", RANGE_ERRORS,
                         ids=[json.dumps(p)[:40] for p, *_ in RANGE_ERRORS])
def test_invalid_values_are_400_naming_field_and_range(api, payload, field, allowed, got):
    r = api.client.post("/release_task", json=payload)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and field in detail and allowed in detail, detail
    if got:
        assert f"got {got}" in detail or f"got '{got}'" in detail, detail
    assert api.backend.store.counts()["total"] == 0


def test_nested_source_error_names_where_it_came_from(api):
    r = api.client.post("/release_task", json={"param_obj": {"duration": 5}})
    assert r.status_code == 400 and r.json()["detail"].startswith("param_obj.duration (audio_duration):")


@pytest.mark.parametrize("body,ct,status,detail", [
    (b"{bad", "application/json", 400, "Invalid JSON body"),
    (b"", "application/json", 400, "Invalid JSON body"),
    (b"[1, 2]", "application/json", 400, "JSON payload must be an object"),
    (b"\"text\"", "application/json", 400, "JSON payload must be an object"),
    (b"[1]", "", 400, "JSON payload must be an object"),
    (b"{bad", "", 400, "Invalid JSON body (hint: set 'Content-Type: application/json')"),
    (b"hello", "text/plain", 415, "Unsupported Content-Type: text/plain; use application/json"),
    (b"", "", 415, "Unsupported Content-Type: (missing)"),
    (b"\xff\xfe\x00garbage", "application/json", 400, "Invalid JSON body"),
    (b"[" * 100000, "application/json", 400, ""),
    (b"--x\r\nbroken", "multipart/form-data; boundary=x", None, ""),
    (b"a=1", "multipart/form-data", 400, ""),
    (b"prompt=%ff%fe", "application/x-www-form-urlencoded", None, ""),
])
def test_malformed_bodies_are_4xx(api, body, ct, status, detail):
    r = api.client.post("/release_task", content=body, headers={"Content-Type": ct})
    if status is None:  # parsed leniently: anything but a server error
        assert r.status_code < 500, r.text
        return
    assert r.status_code == status, r.text
    assert r.json()["detail"].startswith(detail), r.json()


def test_oversized_upload_is_413_and_stores_nothing(settings):
    api = make_api(settings, max_upload_mb=1)
    r = api.client.post("/release_task", data={"task_type": "cover"},
                        files={"src_audio": ("big.wav", b"x" * (1024 * 1024 + 10), "audio/wav")})
    assert r.status_code == 413 and "1 MB" in r.json()["detail"]
    assert api.backend.store.counts()["total"] == 0


def test_oversized_text_body_is_413(api):
    r = api.client.post("/release_task", content=b"{" + b" " * (3 * 1024 * 1024) + b"}",
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_declared_content_length_too_big_is_413_before_reading(api):
    r = api.client.post("/release_task", content=b"{}", headers={"Content-Type": "application/json",
                                                                 "Content-Length": str(10**10)})
    assert r.status_code == 413


@pytest.mark.parametrize("route", ["/release_task", "/query_result", "/v1/uploads", "/format_input"])
def test_unpaired_surrogates_are_400(api, route):
    for body in (b'{"prompt": "\\ud800"}', b'{"task_id_list": ["\\udfff"]}', b'{"\\ud800": 1}'):
        r = api.client.post(route, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (route, body, r.text)


def test_huge_numbers_and_nul_paths_are_400(api):
    for payload in ({"duration": int("9" * 4000)}, {"bpm": 10**30}, {"src_audio_path": "a\x00b", "task_type": "cover"},
                    {"guidance_scale": "1e999"}, {"seed": "NaN"}):
        r = api.client.post("/release_task", json=payload)
        assert r.status_code == 400, (payload, r.text)


def test_a_400_quotes_at_most_a_short_piece_of_a_huge_value(api):
    """The audit found 1 MB error answers (and log lines) echoing a 1 MB invalid value in full."""
    for field in ("audio_format", "task_type", "model", "infer_method", "lm_backend", "use_random_seed"):
        r = api.client.post("/release_task", json={"prompt": "p", field: "z" * 100_000})
        assert r.status_code == 400 and field in r.json()["detail"] and len(r.content) < 400, (field, len(r.content))
