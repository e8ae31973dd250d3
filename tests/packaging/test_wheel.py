"""What users install works without the checkout: build the wheel, install it into a
fresh venv, and run ``inferlane --help`` and ``inferlane serve --manifests`` from it.

Offline and quick: the wheel is built from a copy of the sources with the test venv's
setuptools (no build isolation, so no index), installed without dependencies, and the
fresh venv reaches the dependencies the test venv already has through a ``.pth`` line.
That line adds the directory only: the test venv's own ``.pth`` files (its editable
install of this checkout among them) are not processed, so nothing comes from the
checkout. Everything runs from a directory outside it.
"""

from __future__ import annotations

import json
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("xds_server", "mesh", "routing", "mtls", "ratelimit")
STARTUP_S = 60.0


def run(*argv: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{argv}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` directory of a fresh venv with the wheel installed."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in (*PACKAGES, "bench"):  # bench is copied so that leaving it out is tested
        shutil.copytree(ROOT / package, source / package, ignore=ignore)
    dist = work / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--no-index", "-w", dist, source, cwd=work)  # fmt: skip
    (wheel,) = dist.glob("inferlane-*.whl")
    venv = work / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=work)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        wheel, cwd=work)  # fmt: skip
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=work)
    deps = {sysconfig.get_path("purelib"), *site.getsitepackages()}
    Path(purelib.stdout.strip(), "test-venv-deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return venv / "bin"


def test_the_installed_command_runs_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    done = run(installed / "inferlane", "--help", cwd=tmp_path)
    for command in ("serve", "bootstrap", "inject", "status", "analyze", "describe"):
        assert command in done.stdout
    probe = (
        "import importlib.util, xds_server; print(xds_server.__file__); "
        "print(importlib.util.find_spec('bench'))"
    )
    where, bench = run(installed / "python", "-c", probe, cwd=tmp_path).stdout.split()
    assert Path(where).is_relative_to(installed.parent), where
    assert not Path(where).is_relative_to(ROOT)
    assert bench == "None", "bench/ runs from a checkout only; it must not be in the wheel"


def test_serve_manifests_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples" / "cluster", tmp_path / "cluster")
    ports_file = tmp_path / "ports.json"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            str(installed / "inferlane"),
            "--log-format=json",
            "serve",
            "--manifests",
            "cluster",
            "--host",
            "127.0.0.1",
            *("--xds-port", "0", "--xds-tls-port", "0", "--admin-port", "0", "--rls-port", "0"),
            "--ports-file",
            str(ports_file),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + STARTUP_S
        while not ports_file.exists() or not ports_file.read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "inferlane serve did not write its ports"
            time.sleep(0.1)
        admin = f"http://127.0.0.1:{json.loads(ports_file.read_text())['admin']}"
        services: dict[str, list[dict[str, str]]] = {}
        while not services.get("services"):
            assert time.monotonic() < deadline, "no world loaded"
            with urllib.request.urlopen(admin + "/debug/services", timeout=5) as response:
                services = json.loads(response.read())
            time.sleep(0.1)
        assert sorted(s["name"] for s in services["services"]) == ["embedder", "llama"]
        with urllib.request.urlopen(admin + "/readyz", timeout=5) as response:
            assert response.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        log.close()
    assert code == 0
    lines = (tmp_path / "serve.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any(r["msg"].startswith("serving on 127.0.0.1") for r in records)
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
