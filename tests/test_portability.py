"""Windows safety: the CLI and the server import without POSIX-only modules (resource, fcntl, pwd)."""

from __future__ import annotations

import shutil
import subprocess
import sys

# psutil is loaded first: its Linux backend needs `resource`, its Windows backend does not
BLOCK_POSIX = (
    "import sys, psutil\n"
    "for name in ('resource', 'fcntl', 'pwd', 'grp', 'termios'):\n"
    "    sys.modules[name] = None\n"
)


def test_cli_and_app_import_without_posix_modules():
    code = BLOCK_POSIX + (
        "import ortllm.cli.main, ortllm.web.app, ortllm.benchmark\n"
        "from ortllm.benchmark import peak_rss_mb\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_a_regular_install_holds_every_package(tmp_path):
    """A non-editable install (pip install ortllm, a container image) has every subpackage and the web UI."""
    from .conftest import REPO

    # from a copy of the checkout's files: a build/ folder left in the checkout would hide a missing package
    source = tmp_path / "src"
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    )
    for name in listed.stdout.splitlines():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation"]
        + ["--no-compile", "--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # every source folder with an __init__.py, at its installed place (cli/, web/, converters/ live in ortllm.*)
    for init in sorted(REPO.glob("*/**/__init__.py")):
        rel = init.parent.relative_to(REPO)
        if rel.parts[0] in ("tests", "benchmarks", "scripts", "build") or rel.parts[0].startswith("."):
            continue
        installed = rel if rel.parts[0] == "ortllm" else "ortllm" / rel
        assert (target / installed / "__init__.py").is_file(), f"{rel} is missing from the installed package"
    assert (target / "ortllm" / "web" / "static" / "index.html").is_file()
    code = "import ortllm.cli.main, ortllm.web.app, ortllm.runtime.scheduler; print('ok')"
    env = {"PYTHONPATH": str(target), "PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"}
    # run from an empty folder so the checkout cannot stand in for the installed copy
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env
    )
    assert proc.returncode == 0, proc.stderr
