"""Run a module as a child process that dies with its parent: `python -m ortllm.converters.child PID MODULE ARGS`.

A `kill -9` of `ortllm pull` must not leave the model builder running as an orphan. On Linux the child
arms PR_SET_PDEATHSIG on itself (here rather than in a `preexec_fn`, which is unsafe in a process with
threads); elsewhere a watchdog thread polls the parent. Either way the child exits at once when the
parent is already gone by the time it starts.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 1.0


def command(parent: int, module: str, *args: str) -> list[str]:
    """The command line that runs `python -m module args` guarded by the parent `parent`."""
    return [sys.executable, "-m", "ortllm.converters.child", str(parent), module, *args]


def parent_alive(parent: int) -> bool:
    if os.name == "posix":
        return os.getppid() == parent  # an orphan is re-parented (to init or a subreaper)
    import psutil

    return psutil.pid_exists(parent)


def guard(parent: int) -> None:
    """Make this process end when `parent` does."""
    armed = False
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    if not parent_alive(parent):  # it died before the signal was armed
        os._exit(1)
    if not armed:

        def watch() -> None:
            while parent_alive(parent):
                time.sleep(POLL_S)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main() -> None:
    parent, module, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    guard(parent)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
