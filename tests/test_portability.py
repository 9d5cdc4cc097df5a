"""Windows safety: the CLI and the server import without POSIX-only modules (resource, fcntl, pwd)."""

from __future__ import annotations

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
