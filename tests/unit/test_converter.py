"""The warm converter server (tasks/converter.py): a run in a forked child behaves as `python ARGS` in a fresh
process would (working folder, environment, argv, sys.path[0], exit code, output), is killed by pid, and a run
whose import-time settings differ gets a server of its own."""

from __future__ import annotations

import os
import time
from pathlib import Path

from loraforge.tasks import converter


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def test_a_script_runs_as_a_fresh_python_would(tmp_path: Path) -> None:
    script = tmp_path / "tool" / "convert.py"
    script.parent.mkdir()
    (script.parent / "helper.py").write_text("WHERE = 'beside the script'\n")
    script.write_text(
        "import os, sys\n"
        "import helper\n"  # found through sys.path[0], the script's folder
        "print(__name__, sys.argv[1:], os.getcwd(), os.environ['ASKED'], helper.WHERE)\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.exit(int(sys.argv[1]))\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    log = tmp_path / "run.log"
    run = converter.start([str(script), "3", "--flag"], work, _env(ASKED="yes"), log)
    assert run.wait(60) == 3
    assert log.read_text().splitlines() == [
        f"__main__ ['3', '--flag'] {work} yes beside the script",
        "to stderr",
    ]
    ok = converter.start(["-c", "import sys; print(sys.argv)", "x"], work, _env(), log)
    assert ok.wait(60) == 0 and log.read_text() == "['-c', 'x']\n"
    broken = converter.start(["-c", "raise ValueError('no tensors')"], work, _env(), log)
    assert broken.wait(60) == 1 and log.read_text().splitlines()[-1] == "ValueError: no tensors"


def test_a_run_is_killed_by_pid_and_other_import_settings_get_their_own_server(tmp_path: Path) -> None:
    hung = converter.start(["-c", "import time; time.sleep(60)"], tmp_path, _env(), tmp_path / "a.log")
    assert hung.wait(0.2) is None
    started = time.monotonic()
    hung.kill()
    assert hung.wait(30) == -9 and time.monotonic() - started < 10
    first = hung.server
    other = converter.start(["-c", "import os; print(os.environ['OMP_NUM_THREADS'])"], tmp_path,
                            _env(OMP_NUM_THREADS="2"), tmp_path / "b.log")  # fmt: skip
    assert other.wait(60) == 0 and (tmp_path / "b.log").read_text() == "2\n"
    assert other.server is not first
    assert first.process.wait(30) == 0  # the previous server ended once it had no running child
    same = converter.start(["-c", "pass"], tmp_path, _env(OMP_NUM_THREADS="2", UNRELATED="x"), tmp_path / "c.log")
    assert same.wait(60) == 0 and same.server is other.server


def test_a_server_that_dies_takes_its_running_children_with_it(tmp_path: Path) -> None:
    hung = converter.start(["-c", "import time; time.sleep(60)"], tmp_path, _env(), tmp_path / "a.log")
    assert hung.wait(0.2) is None
    hung.server.process.kill()  # crashed or killed: the child's end can no longer be reported by it
    assert hung.wait(30) == -9
    deadline = time.monotonic() + 10
    while _running(hung.pid):
        assert time.monotonic() < deadline, "the orphaned child still runs"
        time.sleep(0.1)
    after = converter.start(["-c", "pass"], tmp_path, _env(), tmp_path / "b.log")  # a new server takes over
    assert after.wait(60) == 0 and after.server is not hung.server


def _running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
