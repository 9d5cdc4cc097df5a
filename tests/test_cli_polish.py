"""First-run polish of the command line (issue 20's CLI items), each run through the real `ortllm`."""

from __future__ import annotations

import json

from tests.conftest import ortllm


def catalog_names() -> list[str]:
    rows = json.loads(ortllm("list", "--available", "--json", check=True).stdout)
    return [r["name"] for r in rows]


def test_list_available_keeps_names_whole_at_80_columns() -> None:
    names = catalog_names()
    out = ortllm("list", "--available", env={"COLUMNS": "80"}, check=True).stdout
    assert max(len(line) for line in out.splitlines()) <= 80, out
    for name in names:
        assert name in out, f"{name} is cut in:\n{out}"
    assert "…" not in out.split("┩", 1)[1].splitlines()[0], out  # no cell of the first row is cut


def test_run_unknown_model_says_where_to_look() -> None:
    proc = ortllm("run", "nope-no-such-model", "hi")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "nope-no-such-model" in lines[0]
    assert "ortllm list --available" in lines[0]
    assert "ortllm pull" not in lines[0]  # pulling an unknown name would fail too
    assert "Traceback" not in proc.stderr


def test_catalog_model_not_installed_suggests_pull() -> None:
    # `run` pulls a catalog model itself; `show` and `rm` answer with the command that installs it
    for command in ("show", "rm"):
        proc = ortllm(command, "llama3")
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "ortllm pull llama-3-8b" in lines[0], lines[0]
