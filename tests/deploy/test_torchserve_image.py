"""docker/torchserve/: the TorchServe image archives every demo model, starts TorchServe with the
config in the foreground, and its config keeps the management API inside the container.

Read as text without a Docker engine, like tests/deploy/test_images.py.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from urllib.parse import urlsplit

from tests.support.deploy_files import (
    MODELS_DIR,
    TORCHSERVE_CONFIG,
    Stage,
    build_of,
    copies,
    dockerfile_instructions,
    dockerfile_stages,
    exec_form,
    healthcheck_cmd,
    model_names,
    properties,
)


def archiver_calls(stage: Stage) -> list[dict[str, str]]:
    """The options of every `torch-model-archiver` command in the stage's RUN lines."""
    calls = []
    for rest in stage.args("RUN"):
        commands = re.split(r"\s*(?:&&|\|\||;)\s*", rest)
        for words in (shlex.split(command) for command in commands):
            if words[:1] != ["torch-model-archiver"]:
                continue
            options = {}
            for word, following in zip(words[1:], [*words[2:], ""], strict=True):
                if word.startswith("--"):
                    options[word] = "" if following.startswith("--") else following
            calls.append(options)
    return calls


def test_torchserve_image_archives_every_model() -> None:
    context, dockerfile = build_of("torchserve")
    stages = dockerfile_stages(dockerfile)
    assert all(stage.base in {"pytorch/torchserve:0.12.0-cpu", "${TORCHSERVE_IMAGE}"}
               for stage in stages)  # fmt: skip
    args = dockerfile_instructions(dockerfile)
    assert ("ARG", "TORCHSERVE_IMAGE=pytorch/torchserve:0.12.0-cpu") in args or all(
        stage.base == "pytorch/torchserve:0.12.0-cpu" for stage in stages
    )
    archived: dict[str, tuple[Stage, dict[str, str]]] = {}
    for stage in stages:
        for call in archiver_calls(stage):
            assert call["--model-name"] not in archived, f"{call['--model-name']} archived twice"
            archived[call["--model-name"]] = (stage, call)
    assert sorted(archived) == model_names(), "every models/<name>/ is archived, nothing else"
    export_paths = set()
    for name, (stage, call) in archived.items():
        handler = call["--handler"]
        origin = next(
            (
                (copy.sources[0], handler.removeprefix(copy.dest.rstrip("/") + "/"))
                for copy in copies(stage)
                if copy.from_stage is None and handler.startswith(copy.dest.rstrip("/") + "/")
            ),
            None,
        )
        assert origin, f"{name}: handler {handler} is not copied into the image"
        source = context / origin[0] / origin[1]
        assert source == MODELS_DIR / name / "handler.py", f"{name} is built from {source}"
        export_paths.add(posixpath.normpath(call["--export-path"]))
    (export_path,) = export_paths
    model_store = properties(TORCHSERVE_CONFIG)["model_store"]
    final = stages[-1]
    if archived[model_names()[0]][0] is not final:  # archived in a build stage: copied over?
        assert any(
            copy.from_stage is not None
            and posixpath.normpath(copy.sources[0]) == export_path
            and posixpath.normpath(copy.dest) == model_store
            for copy in copies(final)
        ), f"the archives in {export_path} never reach {model_store}"
    else:
        assert export_path == model_store


def test_torchserve_image_starts_with_the_config_in_the_foreground() -> None:
    context, dockerfile = build_of("torchserve")
    final = dockerfile_stages(dockerfile)[-1]
    (entrypoint,) = final.args("ENTRYPOINT")
    argv = exec_form(entrypoint, "ENTRYPOINT")
    assert argv[0] == "torchserve"
    assert "--foreground" in argv, "the container must end when TorchServe does"
    config_in_image = argv[argv.index("--ts-config") + 1]
    assert any(
        copy.dest == config_in_image
        and context / copy.sources[0] == TORCHSERVE_CONFIG
        and copy.from_stage is None
        for copy in copies(final)
    ), f"{TORCHSERVE_CONFIG.name} is not copied to {config_in_image}"
    check = " ".join(healthcheck_cmd(final))
    for model in model_names():
        assert re.search(rf"\b{re.escape(model)}\b", check), f"HEALTHCHECK ignores {model}"
    assert "READY" in check
    assert "/models/" in check


def test_torchserve_config() -> None:
    config = properties(TORCHSERVE_CONFIG)
    assert urlsplit(config["inference_address"]).port == 8080
    assert urlsplit(config["management_address"]).port == 8081
    assert urlsplit(config["metrics_address"]).port == 8082
    # The management API can register models from any URL: never beyond the container.
    assert urlsplit(config["management_address"]).hostname == "127.0.0.1"
    assert config["load_models"] == "all"
    assert config["model_store"] == "/home/model-server/model-store"
    assert config["disable_token_authorization"] == "true"
    assert config["enable_model_api"] == "true"
    assert int(config["default_workers_per_model"]) >= 1
