"""The Dockerfile's ENTRYPOINT, ENV and HEALTHCHECK agree with the CLI (CI builds no image:
`scripts/build-image` builds it and runs it)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

from proxy.cli.main import build_parser, config_from_args

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def final_stage() -> list[tuple[str, str]]:
    """The last stage's instructions as (KEYWORD, arguments), continuations joined."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stage: list[tuple[str, str]] = []
    for text in logical:
        keyword, _, rest = text.strip().partition(" ")
        if keyword.upper() == "FROM":
            stage = []
        stage.append((keyword.upper(), rest.strip()))
    return stage


def test_the_image_entrypoint_starts_a_proxy_its_healthcheck_can_reach() -> None:
    """Given only a target, the image's ENTRYPOINT and ENV make a configuration the proxy
    accepts: the proxy on 0.0.0.0:8080, the admin port on loopback where the HEALTHCHECK
    looks."""
    stage = final_stage()
    env: dict[str, str] = {}
    for keyword, rest in stage:
        if keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    (entrypoint,) = [json.loads(rest) for keyword, rest in stage if keyword == "ENTRYPOINT"]
    (healthcheck,) = [rest for keyword, rest in stage if keyword == "HEALTHCHECK"]
    probe = json.loads(healthcheck.split(" CMD ", 1)[1])
    found = re.search(r"https?://[^'\"\s]+/healthz", probe[-1])
    assert found, probe
    url = found.group(0)

    assert entrypoint[0].endswith("/mcp-authproxy") and entrypoint[1] == "run"
    args = build_parser().parse_args([*entrypoint[1:], "--target-url", "https://mcp.example/mcp"])
    config = config_from_args(args, env=env)

    assert (config.host, config.port) == ("0.0.0.0", 8080)
    assert urlsplit(url).hostname == config.admin_host == "127.0.0.1"
    assert urlsplit(url).port == config.admin_port
    assert probe[0].rsplit("/", 1)[0] == entrypoint[0].rsplit("/", 1)[0]  # the same venv


def test_the_image_installs_every_extra_a_run_flag_needs() -> None:
    """`--store redis://` (the redis extra) and uvloop work in the stock image: its pip
    install names every optional extra pyproject.toml declares but the test tools."""
    text = DOCKERFILE.read_text()
    match = re.search(r"constraints\.txt '\.\[([a-z,]+)\]'", text)
    assert match, "the build stage installs the project with its extras"
    installed = set(match.group(1).split(","))
    declared = tomllib.loads((DOCKERFILE.parent / "pyproject.toml").read_text())[
        "project"]["optional-dependencies"]
    assert installed == set(declared) - {"test"}, (installed, set(declared))
