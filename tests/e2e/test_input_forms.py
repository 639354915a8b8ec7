"""The four request forms against real TorchServe: what the model receives is what was sent.

The `digest` test model answers the sha256, size, Python type and content type of every part it
received; `mirror` answers the bytes it received with their content type.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from devstack import Stack
from devstack.local import _banner
from devstack.models import EXAMPLE_IMAGE
from shared.payloads import Part, encode_multipart

pytestmark = pytest.mark.e2e

SIZES = (0, 1, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, 1_000_000, 6_000_000)
FORMS = ("json", "data_uri", "multipart", "raw")
OCTETS = "application/octet-stream"
ROUND_TRIPS: list[str] = []


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, timeout=120) as client:
        yield client
    if ROUND_TRIPS:
        print("\nSHA256 ROUND TRIPS (form, bytes, match):\n" + "\n".join(ROUND_TRIPS))


def payload_of(size: int, seed: int = 0, text: bool = False) -> bytes:
    rng = random.Random(seed * 1_000_003 + size)
    if text:  # a JSON string carries text: ASCII letters, so its UTF-8 bytes are the payload
        return bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz0123456789", k=size))
    return rng.randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def send(
    http: httpx.Client,
    form: str,
    data: bytes,
    model: str = "digest",
    content_type: str | None = OCTETS,
    path: str = "/dispatch_model",
    **fields: Any,
) -> httpx.Response:
    """POST `data` in one of the four forms, with the request fields where that form puts them."""
    fields = {"model_name": model, **fields}
    if form == "json":
        return http.post(path, json={**fields, "input": data.decode("ascii")})
    if form == "data_uri":
        uri = f"data:{content_type or ''};base64,{base64.b64encode(data).decode()}"
        return http.post(path, json={**fields, "data": uri})
    if form == "multipart":
        return http.post(
            path, data=fields, files={"data": ("payload.bin", data, content_type or OCTETS)}
        )
    headers = {"content-type": content_type} if content_type else {}
    return http.post(path, params=fields, content=data, headers=headers)


def prediction(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()["prediction_value"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("form", FORMS)
def test_the_model_receives_exactly_the_bytes_sent(
    http: httpx.Client, form: str, size: int
) -> None:
    data = payload_of(size, text=form == "json")
    received = prediction(send(http, form, data))
    part = received["data" if form == "multipart" else "body"]
    match = part["sha256"] == sha(data) and part["size"] == size
    ROUND_TRIPS.append(f"  {form:<9} {size:>9}  {'match' if match else 'MISMATCH'}")
    assert (part["sha256"], part["size"]) == (sha(data), size)
    if form != "json":
        assert part["content_type"] == OCTETS
        assert part["type"] == "bytearray"


def test_several_file_parts_keep_names_and_content_types(http: httpx.Client) -> None:
    parts = {
        "data": ("picture.png", payload_of(70_000, 1), "image/png"),
        "mask": ("mask.bin", payload_of(1_000, 2), OCTETS),
        "notes": ("notes.txt", "grüße ✓".encode(), "text/plain"),
        "empty": ("empty.bin", b"", OCTETS),
    }
    files = [(name, value) for name, value in parts.items()]
    received = prediction(http.post("/dispatch_model", data={"model_name": "digest"}, files=files))
    assert set(received) == set(parts)
    for name, (_, data, content_type) in parts.items():
        assert received[name]["sha256"] == sha(data), name
        assert received[name]["content_type"] == content_type, name
    assert received["notes"]["type"] == "str"  # TorchServe decodes text/* parts


@pytest.mark.parametrize("form", ["raw", "data_uri", "multipart"])
def test_text_plain_bodies_arrive_as_text(http: httpx.Client, form: str) -> None:
    text = "plain words, ünïcödé and ✓ 🙂\n" * 100
    received = prediction(send(http, form, text.encode(), content_type="text/plain"))
    part = received["data" if form == "multipart" else "body"]
    assert part["type"] == "str"
    assert part["sha256"] == sha(text.encode())
    assert part["content_type"] == "text/plain"


def test_input_media_type_names_bytes_that_carry_no_type(http: httpx.Client) -> None:
    data = payload_of(5_000, 3)
    raw = send(http, "raw", data, content_type=None, input_media_type="image/png")
    uri = send(http, "data_uri", data, content_type=None, input_media_type="image/png")
    # Fields for the multipart request come first, as form fields without a filename.
    fields = (
        Part(name="model_name", size=6),
        Part(name="input_media_type", size=9),
        Part(name="data", filename="x", size=len(data)),
    )
    body, content_type = encode_multipart(fields, b"digest" + b"image/png" + data)
    form = http.post("/dispatch_model", content=body, headers={"content-type": content_type})
    for response, name in ((raw, "body"), (uri, "body"), (form, "data")):
        part = prediction(response)[name]
        assert part["content_type"] == "image/png"
        assert part["sha256"] == sha(data)
    # Without input_media_type and without a type of their own: application/octet-stream.
    assert prediction(send(http, "raw", data, content_type=None))["body"]["content_type"] == OCTETS


def test_trailing_slash_path_is_answered_directly(http: httpx.Client) -> None:
    for form in FORMS:
        response = send(http, form, payload_of(10, text=True), path="/dispatch_model/")
        assert response.status_code == 200, (form, response.status_code, response.text)
    echoed = http.post("/dispatch_model/", json={"model_name": "echo", "input": {"a": 1}})
    assert echoed.status_code == 200
    assert echoed.json()["prediction_value"] == {"a": 1}


@pytest.mark.parametrize("form", ["raw", "data_uri", "multipart"])
@pytest.mark.parametrize("size", [1, 1_000_000, 6_000_000])
def test_binary_answers_round_trip_byte_exact(http: httpx.Client, form: str, size: int) -> None:
    data = payload_of(size, 4)
    response = send(http, form, data, model="mirror", content_type="image/png")
    value = prediction(response)
    assert value == "data:image/png;base64," + base64.b64encode(data).decode()
    raw = http.get(f"/tasks/{response.json()['task_id']}/result")
    assert raw.status_code == 200
    assert raw.headers["content-type"] == "image/png"
    assert raw.content == data


def test_text_and_json_answers_through_result(http: httpx.Client) -> None:
    text = "ünïcödé answer ✓"
    response = send(http, "raw", text.encode(), model="mirror", content_type="text/plain")
    assert prediction(response) == text
    raw = http.get(f"/tasks/{response.json()['task_id']}/result")
    assert raw.headers["content-type"].startswith("text/plain")
    assert raw.content == text.encode()

    echoed = http.post("/dispatch_model", json={"model_name": "echo", "input": {"x": [1, 2]}})
    raw = http.get(f"/tasks/{echoed.json()['task_id']}/result")
    assert raw.headers["content-type"] == "application/json"
    assert json.loads(raw.content) == {"x": [1, 2]}


def test_result_of_unknown_or_unsucceeded_tasks(http: httpx.Client) -> None:
    missing = http.get("/tasks/00000000-0000-0000-0000-000000000000/result")
    assert missing.status_code == 404
    assert missing.json()["code"] == "task_not_found"
    failed = http.post("/dispatch_model", json={"model_name": "failing", "input": {}})
    assert failed.status_code == 502, failed.text
    conflict = http.get(f"/tasks/{failed.json()['task_id']}/result")
    assert conflict.status_code == 409
    assert conflict.json()["code"] == "no_result"
    assert "failed" in conflict.json()["msg"]


def test_image_demo_models(http: httpx.Client) -> None:
    picture = EXAMPLE_IMAGE.read_bytes()
    info = prediction(
        http.post(
            "/dispatch_model",
            data={"model_name": "image_info"},
            files={"data": ("example.png", picture, "image/png")},
        )
    )
    with Image.open(io.BytesIO(picture)) as image:
        assert info["format"] == "PNG"
        assert (info["width"], info["height"], info["mode"]) == (*image.size, image.mode)
    assert set(info["mean"]) == {"R", "G", "B"}

    gray = send(http, "raw", picture, model="grayscale", content_type="image/png")
    png = http.get(f"/tasks/{gray.json()['task_id']}/result")
    assert png.headers["content-type"] == "image/png"
    assert prediction(gray) == "data:image/png;base64," + base64.b64encode(png.content).decode()
    with Image.open(io.BytesIO(png.content)) as image:
        assert (image.format, image.mode, image.size) == (
            "PNG",
            "L",
            (info["width"], info["height"]),
        )

    rejected = send(http, "raw", b"not a picture", model="image_info", content_type="image/png")
    assert rejected.status_code == 422
    assert rejected.json()["code"] == "model_rejected_input"


def test_the_banners_curl_examples_work(stack: Stack, tmp_path: Path) -> None:
    """Every curl line `make run` prints, run as printed (the task id filled in)."""
    text = _banner(stack.api_url, [])
    commands = [
        " ".join(line.strip() for line in block.replace("\\\n", "\n").splitlines())
        for block in re.findall(r"^  curl .*?(?<!\\)$", text, re.MULTILINE | re.DOTALL)
    ]
    assert any("-F data=@" in c for c in commands)
    assert any("--data-binary @" in c for c in commands)
    task_id = ""
    for command in commands:
        if "<task_id>" in command:
            command = command.replace("<task_id>", task_id)
        done = subprocess.run(
            ["bash", "-c", command + " -w '\\n%{http_code}'"],
            cwd=tmp_path,
            capture_output=True,
            check=True,
            timeout=60,
        )
        body, _, status = done.stdout.rpartition(b"\n")
        assert status in (b"200", b"202"), (command, done.stdout[-500:])
        if body.startswith(b"{") and b"task_id" in body:
            task_id = json.loads(body)["task_id"]
    with Image.open(tmp_path / "out.png") as image:
        assert image.mode == "L"
