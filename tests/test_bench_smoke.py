"""Runs the project's benchmark (bench/bench.py) in its tiny smoke mode, so the harness cannot
rot unnoticed: every row must be in the table, the proxy column must hold numbers, and every
process the benchmark started must be gone when it returns."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "bench.py"

# Out of the default run (it takes most of a minute); .ci/run runs it with -m bench.
pytestmark = pytest.mark.bench


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mcp_authproxy_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the module body runs.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Metric label -> its cells (direct, proxy), from the report's markdown table."""
    rows = {}
    for line in markdown.splitlines():
        if line.startswith("| ") and not line.startswith("| metric"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[cells[0]] = cells[1:]
    return rows


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for every purpose that matters here.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


TOKEN = "bench-test-secret-0123456789"


@dataclass(frozen=True)
class Run:
    done: subprocess.CompletedProcess[str]
    report: str
    raw_json: str


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One smoke run of the benchmark, shared by the tests below (it takes ~10 s)."""
    out = tmp_path_factory.mktemp("bench") / "LATEST.md"
    env = dict(os.environ, MCP_AUTHPROXY_BENCH_TOKEN=TOKEN)
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=45, cwd=REPO, env=env, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return Run(done, out.read_text(), out.with_suffix(".json").read_text())


def test_smoke_run_fills_every_row(smoke_run: Run) -> None:
    """A user running bench.py gets a complete table with numbers in the proxy column."""
    rows = table_rows(smoke_run.report)
    labels = load_bench().ROW_LABELS
    assert set(labels) <= set(rows), f"missing rows: {set(labels) - set(rows)}"
    for label in labels:
        proxy = rows[label][1]
        assert re.search(r"\d", proxy), f"proxy column of {label!r} has no number: {proxy!r}"
    assert rows["SSE 1 stream: events delivered"][1] == "20 / 20"
    assert rows["SSE concurrent streams: events delivered"][1] == "200 / 200"
    assert rows["held SSE streams opened"] == ["10", "10"]
    assert rows["upstream streams still open 1 s after the clients hung up"] == ["0", "0"]


def test_smoke_run_leaves_no_process_running(smoke_run: Run) -> None:
    """When bench.py returns, the upstream and proxy it started are gone."""
    pids = json.loads(smoke_run.raw_json)["meta"]["pids"]
    assert len(pids) == 2
    assert not [pid for pid in pids if alive(pid)]


def test_smoke_run_never_shows_the_credential(smoke_run: Run) -> None:
    """The bearer token the benchmark hands the proxy appears in no output or result file."""
    for text in (smoke_run.done.stdout, smoke_run.done.stderr, smoke_run.report,
                 smoke_run.raw_json):
        assert TOKEN not in text
