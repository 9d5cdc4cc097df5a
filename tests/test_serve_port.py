"""`ortllm serve` on a port already in use: one line naming the address and the flag, exit 1, no banner."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from ortllm.benchmark import free_port
from tests.conftest import ortllm


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another program listens on (127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_main_port_in_use(busy_port: int) -> None:
    proc = ortllm("serve", "--host", "127.0.0.1", "--port", str(busy_port), timeout=30)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == f"error: 127.0.0.1:{busy_port} is in use — pick another with --port"
    assert "serving on" not in proc.stdout + proc.stderr


def test_ollama_port_in_use(busy_port: int) -> None:
    proc = ortllm(
        "serve", "--host", "127.0.0.1", "--port", str(free_port()), "--ollama", str(busy_port), timeout=30
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == f"error: 127.0.0.1:{busy_port} is in use — pick another with --ollama"
    assert "serving on" not in proc.stdout + proc.stderr
