"""`mcp-authproxy status`: show the status files of one workload or all, read-only.

A record whose process is gone is shown as such (`gone`), never as its last status:
a crashed proxy cannot say `stopped` itself. Files are read without following links or
blocking (a planted FIFO shows as corrupt), from a state directory only this user can
write (`UnsafePath`, exit 2, otherwise).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..safe_fs import check_owned_dir, ensure_private_dir, read_regular
from ..status.model import Lifecycle, WorkloadRecord
from ..status.store import MAX_FILE_BYTES, decode, pid_alive

FLAG = "--state-dir"

ENDED = (Lifecycle.STOPPED, Lifecycle.FAILED)


def _load(path: Path) -> tuple[dict[str, Any] | None, WorkloadRecord | None]:
    """The file's object (for --json) and its record, via the store's one decoder."""
    try:
        raw = read_regular(path, MAX_FILE_BYTES)
        if raw is None:
            return None, None
        record = decode(raw, path.name.removesuffix(".json"))
    except (OSError, ValueError):
        return None, None
    data: dict[str, Any] = json.loads(raw)
    return data, record


def _since(at: datetime) -> str:
    seconds = int((datetime.now(UTC) - at).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{max(seconds, 0)}s ago"


def shown_status(record: WorkloadRecord) -> str:
    if record.lifecycle not in ENDED and not pid_alive(record.pid):
        return f"gone (was {record.status})"
    return str(record.status)


def show_status(state_dir: Path, name: str | None, *, as_json: bool) -> int:
    """Print one workload or all; raises `UnsafePath` for a state dir others could write."""
    folder = state_dir / "workloads"
    if check_owned_dir(state_dir, flag=FLAG) and ensure_private_dir(folder, flag=FLAG,
                                                                    create=False):
        paths = [folder / f"{name}.json"] if name else sorted(folder.glob("*.json"))
    else:
        paths = [folder / f"{name}.json"] if name else []
    if name and not paths[0].exists() and not paths[0].is_symlink():
        print(f"mcp-authproxy: error: no workload named {name!r} in {folder}", file=sys.stderr)
        return 1
    loaded = [(path, *_load(path)) for path in paths]
    if as_json:
        objects = [data for _, data, _ in loaded if data is not None]
        if name:
            if not objects:
                print(f"mcp-authproxy: error: status file {paths[0]} is corrupt", file=sys.stderr)
                return 1
            print(json.dumps(objects[0], indent=2))
        else:
            print(json.dumps(objects, indent=2))
        return 0
    rows = [("NAME", "STATUS", "SINCE", "REASON", "PROXY URL")]
    for path, _, record in loaded:
        if record is None:
            rows.append((path.stem, "corrupt", "-", "-", "-"))
            continue
        decided = [c for c in record.conditions if not c.status]
        since = decided[0].last_transition_time if decided else record.updated_at
        rows.append((record.name, shown_status(record), _since(since), record.reason,
                     record.proxy_url or "-"))
    if len(rows) == 1:
        print(f"no workloads in {folder}")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    for _, _, record in loaded:
        if name and record is not None:
            print(f"\n{record.message}")
    return 0
