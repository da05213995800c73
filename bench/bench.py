"""mcp-authproxy's own benchmark: the proxy as shipped, measured against a direct connection.

    .venv/bin/python bench/bench.py            # full run, about 1-2 minutes
    .venv/bin/python bench/bench.py --quick    # under a minute
    .venv/bin/python bench/bench.py --smoke    # seconds; what tests/test_bench_smoke.py runs

It starts a loopback MCP-like upstream (bench/upstream.py) and the proxy
(`mcp-authproxy run ... --bearer-token-env BENCH_TOKEN`, credential injection on) as
subprocesses, drives both with a load generator in a third process (wrk when it is on
PATH, else bench/loadgen.py), and prints a markdown table, metrics by rows and
direct / proxy as columns, which it also writes to bench/results/LATEST.md (raw numbers
in LATEST.json). See bench/README.md for what each row means.

It must never leave a process behind: everything it starts runs in its own session and
is stopped by PID (SIGTERM, then SIGKILL) in a `finally`, Ctrl-C and SIGTERM included.
Every server binds 127.0.0.1, and every load loop is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PY = sys.executable
RPC = b'{"jsonrpc":"2.0","id":42,"method":"tools/list","params":{}}'
CLK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class Settings:
    """How long and how hard each scenario runs; one instance per mode."""

    warm_s: float = 1.0
    tp_conns: int = 64
    tp_s: float = 3.0
    c1_s: float = 2.0
    max_requests: int = 2_000_000  # per load run; the duration normally ends it first
    sse_events: int = 200
    sse_interval_ms: int = 10
    sse_streams: int = 100
    big_bytes: int = 256 << 20
    hold_n: int = 1000
    hold_ms: int = 30_000  # the upstream ends held streams after this, leak or not
    quiet_wait_s: float = 2.0  # longest wait for other tenants' CPU bursts before a scenario


MODES = {
    "full": Settings(),
    "quick": Settings(warm_s=0.5, tp_s=1.5, c1_s=1.0, sse_events=100, quiet_wait_s=1.0),
    "smoke": Settings(warm_s=0.2, tp_s=0.5, c1_s=0.3, max_requests=300, sse_events=20,
                      sse_interval_ms=5, sse_streams=10, big_bytes=1 << 20, hold_n=10,
                      hold_ms=10_000, quiet_wait_s=0),
}


# ------------------------------------------------------------------ processes
@dataclass
class Procs:
    """Every process this run starts, so exactly those are stopped, by PID."""

    logs: Path
    started: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # every PID ever started, for the record

    def start(self, name: str, argv: Sequence[str], cpus: set[int] | None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                env=env, start_new_session=True, preexec_fn=pin_to(cpus))
        self.started.append((name, proc))
        self.pids.append(proc.pid)
        return proc

    def stop_all(self) -> None:
        # Each child leads its own session, so its process group is its PID: this reaches
        # it and anything it spawned, and nothing else on the machine.
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for name, proc in reversed(self.started):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"  {name} (pid {proc.pid}) ignored SIGTERM; SIGKILL", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        self.started.clear()


def pin_to(cpus: set[int] | None) -> Callable[[], None] | None:
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def read_line(stream: IO[bytes], proc: subprocess.Popen[Any], timeout: float) -> str:
    """The next stdout line of `proc`, or an error once it exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = stream.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"no output line within {timeout:g} s")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            data = os.read(fd, 1)  # one byte at a time: never read past the line
            if not data:
                raise RuntimeError(f"exited (code {proc.wait(timeout=5)}) before printing a line")
            buf += data
    return buf.decode().strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_fd_limit() -> tuple[int, int]:
    """As many file descriptors as allowed: 1,000 held streams need ~2,000 in the proxy."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # children inherit it
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def http(url: str, data: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


# ---------------------------------------------------------------- /proc reads
def proc_tree(root: int) -> list[int]:
    """`root` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_ticks(root: int) -> int:
    """utime + stime of a process tree, in clock ticks (fields 14 and 15 of /proc/PID/stat)."""
    total = 0
    for pid in proc_tree(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total


def rss_kib(root: int) -> int:
    total = 0
    for pid in proc_tree(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    return total


@dataclass(frozen=True)
class CpuSnap:
    at: float
    machine_busy: int  # all cores, ticks
    ours: float  # this script's tree plus its finished children, ticks


def cpu_snap() -> CpuSnap:
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))  # user nice system irq softirq steal
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished load generators
    return CpuSnap(time.monotonic(), busy,
                   cpu_ticks(os.getpid()) + (usage.ru_utime + usage.ru_stime) * CLK)


def others_pct(a: CpuSnap, b: CpuSnap) -> float:
    """CPU other tenants of this machine used between two snapshots, in % of one core."""
    other = (b.machine_busy - a.machine_busy) - (b.ours - a.ours)
    return max(0.0, 100 * other / CLK / max(1e-3, b.at - a.at))


def wait_quiet(max_wait: float, below_pct: float = 25) -> None:
    """Let another tenant's burst pass before measuring; bounded, so a busy machine only
    costs `max_wait` per scenario (the report's noise row shows what remained)."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        before = cpu_snap()
        time.sleep(0.25)
        if others_pct(before, cpu_snap()) < below_pct:
            return


# ---------------------------------------------------------------- load tools
@dataclass
class Ctx:
    """What every scenario needs to know about this run."""

    settings: Settings
    load_cpus: set[int] | None
    upstream: str  # origin
    wrk: str | None
    seq: int = 0


def loadgen(ctx: Ctx, args: Sequence[str], timeout: float) -> dict[str, Any]:
    argv = [PY, str(HERE / "loadgen.py"), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=pin_to(ctx.load_cpus), check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"loadgen {args[0]} failed: {done.stderr.strip()[-400:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def load_run(ctx: Ctx, url: str, conns: int, seconds: float) -> dict[str, Any]:
    """Keep-alive JSON-RPC POSTs for `seconds` (and at most max_requests)."""
    if ctx.wrk and ctx.settings.max_requests >= 1_000_000:  # wrk cannot cap a count
        argv = [ctx.wrk, "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
                "-s", str(HERE / "wrk_post.lua"), url]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                              preexec_fn=pin_to(ctx.load_cpus), check=False)
        for line in done.stdout.splitlines():
            if line.startswith("BENCHJSON "):
                result: dict[str, Any] = json.loads(line[10:])
                result["rps"] = result["requests"] / result["seconds"]
                return result
        raise RuntimeError(f"wrk gave no result: {done.stderr.strip()[-300:]}")
    return loadgen(ctx, ["rps", "--url", url, "--conns", str(conns), "--seconds", str(seconds),
                         "--max-requests", str(ctx.settings.max_requests)], seconds + 40)


# ---------------------------------------------------------------- targets
@dataclass
class Target:
    """One column: the upstream itself (direct) or the proxy in front of it."""

    name: str
    url: str  # the MCP URL a client uses
    proc: subprocess.Popen[bytes] | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    others_pct: list[float] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return self.url.rsplit("/", 1)[0]

    def note(self, scenario: str, message: str) -> None:
        self.errors.append(f"{scenario}: {message}")


def scen_tp(ctx: Ctx, t: Target) -> dict[str, Any]:
    k0 = cpu_ticks(t.proc.pid) if t.proc else 0
    res = load_run(ctx, t.url, ctx.settings.tp_conns, ctx.settings.tp_s)
    if t.proc:
        res["proxy_cpu_s"] = (cpu_ticks(t.proc.pid) - k0) / CLK
    return res


def scen_c1(ctx: Ctx, t: Target) -> dict[str, Any]:
    return load_run(ctx, t.url, 1, ctx.settings.c1_s)


def scen_sse(ctx: Ctx, t: Target, streams: int) -> dict[str, Any]:
    s = ctx.settings
    return loadgen(ctx, ["sse", "--url", t.url, "--streams", str(streams), "--events",
                         str(s.sse_events), "--interval-ms", str(s.sse_interval_ms),
                         "--timeout", "60"], 75)


def scen_big(ctx: Ctx, t: Target) -> dict[str, Any]:
    n = ctx.settings.big_bytes
    return loadgen(ctx, ["big", "--url", f"{t.origin}/big?bytes={n}", "--bytes", str(n),
                         "--timeout", "90"], 100)


def scen_hold(ctx: Ctx, t: Target) -> dict[str, Any]:
    """Hold N idle SSE streams, read the proxy's RSS, hang up, and 1 s later ask the
    upstream how many of them are still open (a proxy that missed the hang-up keeps
    its upstream stream until the upstream's own hold ends)."""
    s = ctx.settings
    ctx.seq += 1
    tag = f"{t.name}-{os.getpid()}-{ctx.seq}"
    out: dict[str, Any] = {}
    if t.proc:
        out["rss_idle_kib"] = rss_kib(t.proc.pid)
    argv = [PY, str(HERE / "loadgen.py"), "hold", "--url", t.url, "--n", str(s.hold_n),
            "--tag", tag, "--hold-ms", str(s.hold_ms), "--open-timeout", "20", "--max-hold", "60"]
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, preexec_fn=pin_to(ctx.load_cpus))
    try:
        assert client.stdout is not None and client.stdin is not None
        line = read_line(client.stdout, client, 60)
        if not line.startswith("READY "):
            raise RuntimeError(f"hold client said {line!r}")
        out["ready"] = json.loads(line[6:])
        if t.proc:
            time.sleep(0.3)  # let the last opened streams' buffers settle
            out["rss_held_kib"] = max(rss_kib(t.proc.pid) for _ in range(3))
        client.stdin.write(b"\n")
        client.stdin.close()
        read_line(client.stdout, client, 20)  # DONE
        client.wait(timeout=20)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=5)
        for pipe in (client.stdout, client.stderr):
            if pipe is not None:
                pipe.close()
    time.sleep(1.0)  # the contract's grace: streams still open after this are leaked
    _, _, body = http(f"{ctx.upstream}/stats?tag={tag}")
    out["left_open"] = json.loads(body)["open_streams_tag"]
    return out


def failure(res: dict[str, Any]) -> str | None:
    """A result's first failure, if any of its requests or streams failed."""
    if res.get("errors"):
        return f"{res['errors']} failed, first: {res.get('first_error')}"
    ready = res.get("ready")
    if isinstance(ready, dict) and ready.get("failed"):
        return f"{ready['failed']} streams failed to open, first: {ready.get('first_error')}"
    return None


def run_scenario(key: str, fn: Callable[[Target], dict[str, Any]],
                 targets: Sequence[Target], quiet_wait_s: float) -> None:
    """Runs one scenario for each target back to back, so drift hits every column alike."""
    for t in targets:
        wait_quiet(quiet_wait_s)
        before = cpu_snap()
        t0 = time.monotonic()
        try:
            res = fn(t)
        except Exception as exc:
            t.note(key, repr(exc))
            continue
        finally:
            other = others_pct(before, cpu_snap())
            t.others_pct.append(other)
        if msg := failure(res):
            t.note(key, msg)
        t.raw[key] = res
        print(f"  {key:<7} {t.name:<7} {time.monotonic() - t0:5.1f} s"
              f"   other processes: {other:3.0f}% of a core", flush=True)


# ---------------------------------------------------------------- startup
def start_upstream(procs: Procs, cpus: set[int] | None, settings: Settings) -> str:
    proc = procs.start("upstream", [PY, str(HERE / "upstream.py"), "--port", "0",
                                    "--max-hold-ms", str(settings.hold_ms)], cpus)
    assert proc.stdout is not None
    return read_line(proc.stdout, proc, 20)


def proxy_command() -> list[str]:
    beside = Path(PY).parent / "mcp-authproxy"
    exe = beside if beside.exists() else REPO / ".venv" / "bin" / "mcp-authproxy"
    return [str(exe)]


def start_redis(procs: Procs, cpus: set[int] | None, directory: Path) -> str:
    """A redis-server of the run's own (loopback, persistence off), for `--store-redis`."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (scripts/install-redis installs it)")
    port = free_port()
    proc = procs.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", str(directory)],
                       cpus)
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = read_line(proc.stdout, proc, deadline - time.monotonic())
        if "Ready to accept connections" in line:
            return f"redis://127.0.0.1:{port}/0"
    raise RuntimeError("redis-server did not become ready")


def start_proxy(procs: Procs, cpus: set[int] | None, upstream: str,
                state_dir: Path, *, name: str = "proxy", store: str | None = None,
                ) -> tuple[subprocess.Popen[bytes], str, list[str]]:
    port = free_port()
    argv = [*proxy_command(), "run", "--target-url", f"{upstream}/mcp", "--port", str(port),
            "--health-interval", "0", "--bearer-token-env", "BENCH_TOKEN",
            "--state-dir", str(state_dir)]  # the shipped log level: one access event per request
    if store is not None:
        argv[-2:-2] = ["--store", store]
    # A fresh random token per run unless a test supplies one to look for in the output;
    # either way it never appears there.
    token = os.environ.get("MCP_AUTHPROXY_BENCH_TOKEN") or secrets.token_urlsafe(24)
    env = dict(os.environ, BENCH_TOKEN=token)
    proc = procs.start(name, argv, cpus, env=env)
    assert proc.stdout is not None
    url = read_line(proc.stdout, proc, 30)
    return proc, url, argv


def sanity(t: Target, expect_auth: str) -> None:
    """One JSON-RPC round trip, and the credential arrived (proxy) or not (direct)."""
    headers = {"Content-Type": "application/json",
               "Accept": "application/json, text/event-stream"}
    status, resp_headers, body = http(t.url, RPC, headers)
    auth = resp_headers.get("X-Bench-Auth")
    if status != 200 or b'"id":42' not in body:
        t.note("sanity", f"POST answered {status}: {body[:120]!r}")
    elif auth != expect_auth:
        t.note("sanity", f"upstream saw credential {auth!r}, expected {expect_auth!r}")


# ------------------------------------------------------------------ report
def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or value != value else format(value, spec)


def pair(a: float | None, b: float | None, spec: str) -> str:
    if a is None or b is None:
        return "—"
    return f"{fmt(a, spec)} / {fmt(b, spec)}"


def delivered(res: dict[str, Any] | None) -> str:
    if not res:
        return "—"
    return f"{res['events']:,} / {res['expected']:,}"


Row = tuple[str, Callable[[dict[str, Any], dict[str, Any]], str]]


def g(raw: dict[str, Any], key: str, field_: str) -> Any:
    return raw.get(key, {}).get(field_)


def cpu_per_request_us(raw: dict[str, Any], _: dict[str, Any]) -> str:
    tp = raw.get("tp", {})
    if "proxy_cpu_s" not in tp or not tp.get("requests"):
        return "—"
    return fmt(tp["proxy_cpu_s"] / tp["requests"] * 1e6, ",.0f")


def added_us(raw: dict[str, Any], direct: dict[str, Any]) -> str:
    mine, base = g(raw, "c1", "p50_us"), g(direct, "c1", "p50_us")
    if raw is direct or mine is None or base is None:
        return "—"
    return fmt(mine - base, ",.0f")


def per_stream_kib(raw: dict[str, Any], _: dict[str, Any]) -> str:
    hold = raw.get("hold", {})
    opened = hold.get("ready", {}).get("open")
    if "rss_held_kib" not in hold or not opened:
        return "—"
    return fmt((hold["rss_held_kib"] - hold["rss_idle_kib"]) / opened, ",.1f")


def mib(raw: dict[str, Any], key: str) -> str:
    value = raw.get("hold", {}).get(key)
    return fmt(value / 1024 if value is not None else None, ",.1f")


ROWS: list[Row] = [
    ("c=64 throughput (req/s)", lambda r, _: fmt(g(r, "tp", "rps"), ",.0f")),
    ("c=64 latency p50 / p99 (ms)",
     lambda r, _: pair(g(r, "tp", "p50_us") and g(r, "tp", "p50_us") / 1000,
                       g(r, "tp", "p99_us") and g(r, "tp", "p99_us") / 1000, ",.2f")),
    ("c=64 proxy CPU per request (µs)", cpu_per_request_us),
    ("c=1 throughput (req/s)", lambda r, _: fmt(g(r, "c1", "rps"), ",.0f")),
    ("c=1 latency p50 / p99 (µs)",
     lambda r, _: pair(g(r, "c1", "p50_us"), g(r, "c1", "p99_us"), ",.0f")),
    ("c=1 added latency p50, proxy - direct (µs)", added_us),
    ("SSE 1 stream: delivery latency p50 / p99 (µs)",
     lambda r, _: pair(g(r, "sse1", "p50_us"), g(r, "sse1", "p99_us"), ",.0f")),
    ("SSE 1 stream: events delivered", lambda r, _: delivered(r.get("sse1"))),
    ("SSE concurrent streams: delivery latency p50 / p99 (µs)",
     lambda r, _: pair(g(r, "sseN", "p50_us"), g(r, "sseN", "p99_us"), ",.0f")),
    ("SSE concurrent streams: events delivered", lambda r, _: delivered(r.get("sseN"))),
    ("large stream GET /big (MB/s)", lambda r, _: fmt(g(r, "big", "mbps"), ",.0f")),
    ("held SSE streams opened", lambda r, _: fmt(g(r, "hold", "ready") and
                                                 g(r, "hold", "ready")["open"], ",d")),
    ("proxy RSS idle, before holding (MiB)", lambda r, _: mib(r, "rss_idle_kib")),
    ("proxy RSS holding the streams (MiB)", lambda r, _: mib(r, "rss_held_kib")),
    ("proxy RSS per held stream (KiB)", per_stream_kib),
    ("upstream streams still open 1 s after the clients hung up",
     lambda r, _: str(g(r, "hold", "left_open")) if g(r, "hold", "left_open") is not None
     else "—"),
    ("other processes' CPU during the runs, mean / max (% of a core)",
     lambda r, _: "—"),  # filled in by render(), which has the Target
]
ROW_LABELS = [label for label, _ in ROWS]


def render(targets: Sequence[Target], meta: dict[str, Any]) -> str:
    direct = targets[0].raw
    s: Settings = meta["settings"]
    lines = [
        f"# mcp-authproxy benchmark ({meta['mode']})", "",
        f"{meta['date']} · {meta['duration_s']:.0f} s · {meta['cpus']} cores · pinning: "
        f"{meta['pinning']} · load generator: {meta['loadgen']}", "",
        f"Python {meta['python']} · aiohttp {meta['aiohttp']} · kernel {meta['kernel']}", "",
        f"proxy: `{meta['proxy_cmd']}`", "",
        f"Scenarios: c=64 for {s.tp_s:g} s, c=1 for {s.c1_s:g} s; SSE {s.sse_events} events "
        f"@ {s.sse_interval_ms} ms on 1 and on {s.sse_streams} streams; /big "
        f"{s.big_bytes / (1 << 20):g} MiB; {s.hold_n:,} held streams.", "",
        "| metric | " + " | ".join(t.name for t in targets) + " |",
        "|---|" + "---:|" * len(targets),
    ]
    for label, cell in ROWS:
        cells = []
        for t in targets:
            if label.startswith("other processes"):
                o = t.others_pct
                cells.append(f"{statistics.mean(o):.0f} / {max(o):.0f}" if o else "—")
            else:
                cells.append(cell(t.raw, direct))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    notes = [f"- {t.name}: {e}" for t in targets for e in t.errors]
    if notes:
        lines += ["", "Errors:", *notes]
    lines += ["", "Rows are explained in bench/README.md. On a shared machine, read columns "
              "with a high *other processes* value with care.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="shorter runs, under a minute")
    mode.add_argument("--smoke", action="store_true", help="tiny run that only checks the harness")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "LATEST.md",
                        help="where the markdown table goes (raw JSON beside it)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--no-wrk", action="store_true", help="use loadgen.py even if wrk exists")
    parser.add_argument("--store-redis", action="store_true",
                        help="also run the proxy with --store redis:// (a redis-server of its "
                        "own) and compare c=64 throughput and c=1 latency with the file store, "
                        "alternating rounds; the other scenarios are skipped")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per scenario with --store-redis (the median is shown)")
    return parser.parse_args(argv)


def compare_stores(ctx: Ctx, targets: Sequence[Target], rounds: int, quiet: float) -> None:
    """c=64 and c=1 for every column, `rounds` times in alternating order; the median."""
    for key, fn, metric in (("tp", scen_tp, "rps"), ("c1", scen_c1, "p50_us")):
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for r in range(rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            run_scenario(key, functools.partial(fn, ctx), order, quiet)
            for t in targets:
                if key in t.raw:
                    runs[t.name].append(t.raw.pop(key))
        for t in targets:
            if runs[t.name]:
                ordered = sorted(runs[t.name], key=lambda res: res.get(metric) or 0)
                t.raw[key] = {**ordered[len(ordered) // 2],
                              "rounds": [round(res.get(metric) or 0) for res in runs[t.name]]}


def store_ratios(targets: Sequence[Target]) -> list[str]:
    """redis / file: throughput ratio, and file / redis for c=1 latency (>= 1 is better)."""
    by_name = {t.name: t.raw for t in targets}
    file_, redis_ = by_name.get("proxy", {}), by_name.get("proxy-redis", {})
    tp_f, tp_r = g(file_, "tp", "rps"), g(redis_, "tp", "rps")
    c1_f, c1_r = g(file_, "c1", "p50_us"), g(redis_, "c1", "p50_us")
    lines = ["", "Store comparison, medians of alternating rounds (>= 0.95 is the target):", ""]
    if tp_f and tp_r:
        lines.append(f"- c=64 throughput, redis / file: {tp_r / tp_f:.3f} "
                     f"(rounds: file {g(file_, 'tp', 'rounds')}, "
                     f"redis {g(redis_, 'tp', 'rounds')})")
    if c1_f and c1_r:
        lines.append(f"- c=1 latency p50, file / redis: {c1_f / c1_r:.3f} "
                     f"(rounds µs: file {g(file_, 'c1', 'rounds')}, "
                     f"redis {g(redis_, 'c1', 'rounds')})")
    return lines


def _exit_on_signal(signum: int, _frame: object) -> NoReturn:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops everything


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = MODES[mode]
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")
    # The proxy gets core 1 to itself; upstream, load generator and this script share core 0,
    # so direct carries the same load as the proxy column and is the ceiling it can reach.
    load_cpus, proxy_cpus = ({0}, {1}) if pin else (None, None)
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    nofile = raise_fd_limit()
    wrk = None if args.no_wrk else shutil.which("wrk")
    if mode == "smoke":
        wrk = None  # wrk cannot stop after a few hundred requests
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)

    tmp = Path(tempfile.mkdtemp(prefix="mcp-authproxy-bench-"))
    procs = Procs(tmp)
    started = time.monotonic()
    targets: list[Target] = []
    proxy_argv: list[str] = []
    try:
        upstream = start_upstream(procs, load_cpus, settings)
        direct = Target("direct", f"{upstream}/mcp")
        targets.append(direct)
        sanity(direct, "none")
        try:
            proc, url, proxy_argv = start_proxy(procs, proxy_cpus, upstream, tmp / "state")
            proxy = Target("proxy", url, proc)
            targets.append(proxy)
            sanity(proxy, "bearer")
        except RuntimeError as exc:
            log = (tmp / "proxy.log").read_text(errors="replace")[-600:]
            print(f"proxy did not start: {exc}; log tail:\n{log}", file=sys.stderr)
        if args.store_redis:
            redis_dir = tmp / "redis"
            redis_dir.mkdir()
            store = start_redis(procs, load_cpus, redis_dir)
            proc, url, _ = start_proxy(procs, proxy_cpus, upstream, tmp / "state-redis",
                                       name="proxy-redis", store=store)
            shared = Target("proxy-redis", url, proc)
            targets.append(shared)
            sanity(shared, "bearer")
        print(f"upstream {upstream}; proxy {targets[-1].url if len(targets) > 1 else '-'}; "
              f"mode {mode}; fds {nofile[0]}; load generator {wrk or 'loadgen.py'}", flush=True)
        ctx = Ctx(settings, load_cpus, upstream, wrk)
        for t in targets:  # warm-up: connection pools, first-use allocations
            with contextlib.suppress(Exception):
                load_run(ctx, t.url, 16, settings.warm_s)
        quiet = settings.quiet_wait_s
        if args.store_redis:
            compare_stores(ctx, targets, max(1, args.rounds), quiet)
        else:
            run_all(ctx, targets, settings, quiet)
        for t in targets:
            if t.proc and t.proc.poll() is not None:
                t.note("run", f"process exited during the run (code {t.proc.returncode})")
    finally:
        procs.stop_all()
        proxy_log = (tmp / "proxy.log").read_text(errors="replace") \
            if (tmp / "proxy.log").exists() else ""
        shutil.rmtree(tmp, ignore_errors=True)
    return finish(args, mode, settings, started, pin, wrk, proxy_argv, procs, targets,
                  proxy_log)


def run_all(ctx: Ctx, targets: Sequence[Target], settings: Settings, quiet: float) -> None:
    """Every scenario, each for every column back to back."""
    run_scenario("tp", lambda t: scen_tp(ctx, t), targets, quiet)
    run_scenario("c1", lambda t: scen_c1(ctx, t), targets, quiet)
    run_scenario("sse1", lambda t: scen_sse(ctx, t, 1), targets, quiet)
    run_scenario("sseN", lambda t: scen_sse(ctx, t, settings.sse_streams), targets, quiet)
    run_scenario("big", lambda t: scen_big(ctx, t), targets, quiet)
    run_scenario("hold", lambda t: scen_hold(ctx, t), targets, quiet)


def finish(args: argparse.Namespace, mode: str, settings: Settings, started: float, pin: bool,
           wrk: str | None, proxy_argv: list[str], procs: Procs, targets: list[Target],
           proxy_log: str) -> int:
    if len(targets) < 2:
        targets.append(Target("proxy", "-", errors=["did not start (see stderr)"]))
    meta = run_meta(mode, settings, started, pin, wrk, proxy_argv)
    meta["pids"] = procs.pids
    report = render(targets, meta)
    if args.store_redis:
        report += "\n".join(store_ratios(targets)) + "\n"
    write_results(args.out, report, meta, targets, proxy_log)
    print()
    print(report)
    print(f"wrote {args.out}")
    return 0 if all(not t.errors for t in targets) else 1


def run_meta(mode: str, settings: Settings, started: float, pin: bool, wrk: str | None,
             proxy_argv: Sequence[str]) -> dict[str, Any]:
    import aiohttp  # only for its version; the orchestrator itself speaks urllib

    # The executable by name and the throwaway state dir as a placeholder: the command
    # reads the same on every machine.
    shown = [Path(proxy_argv[0]).name, *proxy_argv[1:-1], "<tmp>"] if proxy_argv else []
    return {"mode": mode, "settings": settings, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "duration_s": time.monotonic() - started, "cpus": os.cpu_count(),
            "pinning": "proxy on core 1, the rest on core 0" if pin else "none",
            "loadgen": f"wrk ({wrk})" if wrk else "bench/loadgen.py (raw asyncio)",
            "python": platform.python_version(), "aiohttp": aiohttp.__version__,
            "kernel": platform.release(),
            "proxy_cmd": " ".join(shown)}


def write_results(out: Path, report: str, meta: dict[str, Any], targets: Sequence[Target],
                  proxy_log: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    raw = {"meta": {**meta, "settings": asdict(meta["settings"])},
           "targets": {t.name: {"raw": t.raw, "errors": t.errors, "others_pct": t.others_pct}
                       for t in targets},
           "proxy_log_tail": proxy_log[-4000:]}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # main()'s finally has already stopped everything it started.
        print("interrupted; every process this run started is stopped", file=sys.stderr)
        sys.exit(130)
