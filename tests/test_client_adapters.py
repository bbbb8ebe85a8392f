"""acestep_client's adapters (issue 24) against the in-process app on the embedded backend: upload (a folder
as upstream's trainer writes it is zipped, a .safetensors sent as is), the listing and the models each fits,
a request's `adapter`/`adapter_scale` from generate, the server's 400 words for a bad adapter, the CLI's
`adapters list|upload|delete` and `generate --adapter/--adapter-scale`."""
from __future__ import annotations

import asyncio
import io
import json
import zipfile

import httpx
import pytest

from acestep_client import ACEStepClient, APIError, AsyncACEStepClient, NotSupported, cli, protocol
from tests.api_support import KEY, make_api
from tests.adapter_support import lora_file

MODEL = "acestep-v15-turbo"


@pytest.fixture
def api(settings):
    return make_api(settings, api_key=KEY)


@pytest.fixture
def client(api):
    with ACEStepClient("http://testserver", KEY, http=api.client) as c:
        yield c


def trainer_output(root, name: str = "my-style"):
    """<name>/final/ as upstream's trainer leaves it, with a checkpoint beside it that must not be uploaded."""
    final = root / name / "final"
    final.mkdir(parents=True)
    (final / "adapter_model.safetensors").write_bytes(lora_file())
    (final / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                           "target_modules": ["q_proj", "v_proj"]}))
    (root / name / "checkpoints" / "epoch_1").mkdir(parents=True)
    (root / name / "checkpoints" / "epoch_1" / "optimizer.pt").write_bytes(b"\0" * 4096)
    return root / name


def stored_adapters(api, task_id: str) -> list[tuple]:
    return [(a.name, a.scale) for a in api.backend.store.get(task_id).request.adapters]


def test_upload_list_and_generate_with_stacked_adapters(api, client, tmp_path):
    folder = trainer_output(tmp_path)
    stored = client.upload_adapter(str(folder))
    assert (stored.name, stored.kind, stored.rank, stored.alpha, stored.created) == ("my-style", "lora", 2, 4.0, True)
    assert stored.fits_models == (MODEL,) and stored.source == "uploaded"
    with zipfile.ZipFile(io.BytesIO(api.backend.blobs.get(stored.where))) as zf:  # the two PEFT files only
        assert sorted(zf.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert client.upload_adapter(str(folder)).created is False  # same content, same name

    single = tmp_path / "b.safetensors"
    single.write_bytes(lora_file(rank=4))
    assert client.upload_adapter(str(single), "style-b").rank == 4

    listing = client.list_adapters()
    assert sorted(a.name for a in listing.adapters) == ["my-style", "style-b"]
    assert [a.name for a in listing.fitting(MODEL)] == [a.name for a in listing.adapters]
    assert listing.fitting("another-model") == () and listing.max_bytes == api.settings.max_adapter_bytes

    task = client.submit("p", adapter=["my-style", "style-b"], adapter_scale=[0.5, -1])
    assert stored_adapters(api, task.task_id) == [("my-style", 0.5), ("style-b", -1.0)]
    task = client.submit("p", adapter="style-b", adapter_scale=0)
    assert stored_adapters(api, task.task_id) == [("style-b", 0.0)]


def test_the_servers_words_for_a_bad_adapter_and_a_bad_path(client, tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(lora_file(in_features=1000))
    with pytest.raises(APIError) as bad:
        client.upload_adapter(str(wrong))
    assert bad.value.status_code == 400 and "1000" in str(bad.value)
    with pytest.raises(APIError) as unknown:
        client.submit("p", adapter="nope")
    assert unknown.value.status_code == 400 and "no adapter named 'nope'" in str(unknown.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="a folder without adapter_model.safetensors"):
        client.upload_adapter(str(tmp_path / "empty"))
    assert client.list_adapters().adapters == ()


def test_async_client_uploads_lists_and_submits(api, tmp_path):
    single = tmp_path / "async-style.safetensors"
    single.write_bytes(lora_file())

    async def run():
        transport = httpx.ASGITransport(app=api.client.app)
        async with AsyncACEStepClient("http://testserver", KEY,
                                      http=httpx.AsyncClient(transport=transport)) as client:
            stored = await client.upload_adapter(str(single))
            names = [a.name for a in (await client.list_adapters()).adapters]
            task = await client.submit("p", adapter=stored.name, adapter_scale=0.25)
            return stored, names, task

    stored, names, task = asyncio.run(run())
    assert stored.name == "async-style" and names == ["async-style"]
    assert stored_adapters(api, task.task_id) == [("async-style", 0.25)]


def run_cli(client, *argv: str) -> int:
    """One `acestep` command through the CLI's parser and command, on the in-process client."""
    args = cli.build_parser().parse_args(list(argv))
    return cli.COMMANDS[args.command](client, args)


def test_cli_adapters_and_generate_with_an_adapter(api, client, tmp_path, capsys):
    folder = trainer_output(tmp_path, "cli-style")
    assert run_cli(client, "adapters", "upload", str(folder), "--name", "cli-style") == cli.OK
    assert capsys.readouterr().out.startswith("stored cli-style  (lora, rank 2, ")
    assert run_cli(client, "adapters", "upload", str(tmp_path)) == cli.USAGE  # no adapter in that folder
    assert "a folder without" in capsys.readouterr().err
    assert run_cli(client, "adapters", "list", "--model", MODEL) == cli.OK
    size = client.list_adapters().adapters[0].size_bytes
    assert size is not None and 1e3 < size < 1e6
    assert capsys.readouterr().out == f"cli-style  (lora, rank 2, {size / 1e3:.0f} kB, uploaded; fits: {MODEL})\n"
    assert run_cli(client, "adapters", "list", "--model", "another-model", "--json") == cli.OK
    assert json.loads(capsys.readouterr().out)["adapters"] == []

    args = cli.build_parser().parse_args(["generate", "p", "--adapter", "cli-style", "--adapter-scale", "0.5"])
    assert cli._fields(args) == {"adapter": "cli-style", "adapter_scale": 0.5}
    args = cli.build_parser().parse_args(["generate", "p", "--adapter", "a", "--adapter", "b",
                                          "--adapter-scale", "1", "--adapter-scale", "-0.5"])
    fields = cli._fields(args)
    assert (fields["adapter"], fields["adapter_scale"]) == (["a", "b"], [1.0, -0.5])
    task = client.submit("p", **cli._fields(cli.build_parser().parse_args(
        ["generate", "p", "--adapter", "cli-style", "--adapter-scale", "0.5"])))
    assert stored_adapters(api, task.task_id) == [("cli-style", 0.5)]


def test_delete_adapter_and_the_cli_exit_codes(api, client, tmp_path, capsys):
    for name in ("gone", "busy"):
        (tmp_path / f"{name}.safetensors").write_bytes(lora_file(rank=2 if name == "gone" else 4))
        client.upload_adapter(str(tmp_path / f"{name}.safetensors"))
    assert client.delete_adapter("gone") is True
    assert [a.name for a in client.list_adapters().adapters] == ["busy"]
    with pytest.raises(APIError) as unknown:
        client.delete_adapter("gone")
    assert unknown.value.status_code == 404 and not isinstance(unknown.value, NotSupported)
    client.submit("p", adapter="busy")  # queued: the server keeps what a task will need
    with pytest.raises(APIError) as refused:
        run_cli(client, "adapters", "delete", "busy")
    assert refused.value.status_code == 409 and cli.exit_code(refused.value) == cli.REFUSED
    api.run_worker()
    assert run_cli(client, "adapters", "delete", "busy") == cli.OK
    assert capsys.readouterr().out == "adapter busy: deleted\n"


def test_a_server_without_adapters_is_not_supported():
    """An upstream server has no /v1/adapters routes: FastAPI's 404 "Not Found", exit 7 (not "no adapter")."""
    missing = httpx.MockTransport(lambda request: httpx.Response(404, json={"detail": "Not Found"}))
    with ACEStepClient("http://upstream", http=httpx.Client(transport=missing)) as client:
        for call in (client.list_adapters, lambda: client.delete_adapter("x")):
            with pytest.raises(NotSupported) as caught:
                call()
            assert cli.exit_code(caught.value) == cli.UNSUPPORTED


def test_an_adapter_upload_to_another_origin_goes_without_the_api_key():
    ticket = {"upload_url": "https://bucket.s3.amazonaws.com/uploads/x?X-Amz-Signature=s", "method": "PUT",
              "headers": {"Content-Type": "application/octet-stream"}, "key": "uploads/x"}
    put = protocol.adapter_put("http://api.example", ticket, b"x")
    assert put.url == ticket["upload_url"] and put.with_key is False
    put = protocol.adapter_put("http://api.example", dict(ticket, upload_url="/v1/adapters/uploads/k"), b"x")
    assert put.url == "http://api.example/v1/adapters/uploads/k" and put.with_key is True
