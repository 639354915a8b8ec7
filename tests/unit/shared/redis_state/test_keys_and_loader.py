"""The key names have one definition, every script is documented and has one typed wrapper,
and no Redis command is left in a Python string."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import redis
from kombu.transport.redis import Channel

from shared.redis_state import keys, loader

ROOT = Path(__file__).resolve().parents[4]
PACKAGE = ROOT / "shared" / "redis_state"
LUA = PACKAGE / "lua"


def test_every_script_loads_into_redis(r: redis.Redis) -> None:
    assert len(loader.script_names()) == 18
    for name in loader.script_names():
        assert r.script_load(loader.source(name))


def test_every_script_opens_with_its_keys_args_reply_and_writes() -> None:
    for name in loader.script_names():
        text = (LUA / f"{name}.lua").read_text()
        header = text[: text.index("\nlocal") if "\nlocal" in text else len(text)]
        assert header.startswith(f"-- {name}: "), name
        for part in (
            f"-- {name}(",
            "--   keys=[",
            "--   args=[",
            "-- Returns",
            "\n-- Reads",
            "\n-- Writes",
        ):
            assert part in header, (name, part)


def test_every_script_has_exactly_one_wrapper() -> None:
    registered: list[str] = []
    for module in PACKAGE.glob("*_scripts.py"):
        registered += re.findall(r'^    name = "(\w+)"$', module.read_text(), re.MULTILINE)
    assert sorted(registered) == sorted(loader.script_names())


def test_no_key_name_is_spelled_in_lua() -> None:
    for path in LUA.glob("*.lua"):
        assert keys.NAMESPACE not in path.read_text(), path.name


def test_no_redis_command_in_a_python_string() -> None:
    offenders = []
    for folder in ("api", "worker", "shared", "devstack", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if "redis.call" in path.read_text():
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_the_prelude_defines_every_lua_key() -> None:
    prelude = loader.source("task_start")
    for name, value in keys.LUA_KEYS.items():
        assert f"{name} = '{value}'" in prelude
    assert "['interactive'] = 'dispatch.interactive'" in prelude
    assert f"local PUBLISH_INLINE_BYTES = {keys.PUBLISH_INLINE_BYTES}" in prelude


def test_the_layout_table_names_every_key_of_keys_py() -> None:
    names = {
        value
        for name, value in vars(keys).items()
        if name.endswith(("_KEY", "_PREFIX", "_CHANNEL")) and isinstance(value, str)
    }
    patterns = " ".join(spec.pattern for spec in keys.KEY_LAYOUT)
    assert {name for name in names if name not in patterns} == set()
    for spec in keys.KEY_LAYOUT:
        assert all((spec.pattern, spec.type, spec.holds, spec.written_by, spec.read_by, spec.ttl))


def test_the_kombu_keys_are_kombus() -> None:
    assert Channel.unacked_key == keys.KOMBU_UNACKED_KEY
    assert Channel.unacked_index_key == keys.KOMBU_UNACKED_INDEX_KEY


def test_the_scripts_ship_as_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]
    assert "lua/*.lua" in data["shared.redis_state"]


def test_key_functions() -> None:
    assert keys.task_key("t") == "dispatch:task:t"
    assert keys.payload_key("t") == "dispatch:payload:t"
    assert keys.queued_key("dispatch.batch") == "dispatch:queued:dispatch.batch"
    assert keys.idempotency_key("h") == "dispatch:idem:h"
    assert keys.batch_idempotency_key("h") == "dispatch:idem:batch:h"
    assert keys.batch_key("b") == "dispatch:batch:b"
    assert keys.event_key("e") == "dispatch:webhook:event:e"
    assert keys.log_key("t") == "dispatch:webhook:log:t"


def test_the_layout_renders_as_one_markdown_row_per_key() -> None:
    rows = keys.layout_markdown().splitlines()
    assert len(rows) == 2 + len(keys.KEY_LAYOUT)
    assert rows[2].startswith("| `dispatch:task:<task id>` | hash |")
    assert all(row.count(" | ") == 5 for row in rows[2:])


def test_a_script_carries_the_helpers_it_calls_and_no_others() -> None:
    helpers = loader.helpers()
    assert list(helpers)[:2] == ["held_id", "with_task_id"]
    assert all(block.endswith("\nend") for block in helpers.values())
    submit = loader.source("task_submit")
    assert "local function held_id(" in submit
    assert "local function end_task(" not in submit
    assert "local QUEUE_OF" not in submit
    cancel = loader.source("task_cancel")
    for called in ("cancel_queued", "end_task", "moved", "batch_move", "end_batch", "emit_event"):
        assert f"local function {called}(" in cancel
    assert "local function held_id(" not in cancel
    defer = loader.source("outbox_defer")
    assert "local function" not in defer
    assert "local K" not in defer
    claim = loader.source("outbox_claim")  # a task.output's first claim reads its outputs
    for called in ("read_outputs", "emit_output"):
        assert f"local function {called}(" in claim
    assert "local function emit_event(" not in claim
