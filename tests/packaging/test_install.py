"""A non-editable install ships every subpackage: what `pip install mcp-authproxy` gives."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 300.0  # building a wheel may fetch setuptools into pip's build env


@pytest.mark.timeout(BUILD_TIMEOUT + 60)
def test_a_wheel_install_runs_the_console_script(tmp_path: Path) -> None:
    """Installed from a wheel into a fresh venv (no source tree on the path), the console
    script starts and every subpackage imports."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
         "-w", str(wheels), str(PROJECT)],
        check=True, timeout=BUILD_TIMEOUT, cwd=tmp_path, capture_output=True,
    )
    (wheel,) = wheels.glob("mcp_authproxy-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    bin_ = venv / "bin"
    subprocess.run([str(bin_ / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", "--no-index", str(wheel)],
                   check=True, timeout=120, capture_output=True)
    # The runtime dependencies come from this test's environment, added as a plain path:
    # `.pth` files there (the editable install of the source tree) are not processed.
    purelib = sysconfig.get_paths()["purelib"]
    site = subprocess.run([str(bin_ / "python"), "-c", "import sysconfig; "
                           "print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    (Path(site) / "deps.pth").write_text(purelib + "\n")

    helped = subprocess.run([str(bin_ / "mcp-authproxy"), "--help"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "run" in helped.stdout and "status" in helped.stdout
    probe = ("import pkgutil, proxy; "
             "print(proxy.__file__); "
             "print(sorted(m.name for m in pkgutil.walk_packages(proxy.__path__, 'proxy.')))")
    where = subprocess.run([str(bin_ / "python"), "-c", probe], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    location, modules = where.stdout.splitlines()
    assert location.startswith(site), location  # the wheel's copy, not the source tree
    for package in ("wire", "forwarding", "credentials", "status", "monitor", "cli"):
        assert f"'proxy.{package}'" in modules, package
    imported = subprocess.run(
        [str(bin_ / "python"), "-c", "import proxy.wire.server, proxy.forwarding.handler, "
         "proxy.monitor.auth, proxy.cli.main, proxy.status.store, proxy.credentials.oauth"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
