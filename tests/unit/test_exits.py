"""How loraforge ends: exit codes that tell a user error from a bug or an interrupt, a closed pipe, a hung tool."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import loraforge.flows.cli as cli
from loraforge.tasks.config import DEMO_CONFIG, load_config
from loraforge.tasks.errors import ConfigError, StageError

ROOT = Path(__file__).resolve().parents[2]


def test_an_internal_error_exits_3_with_one_line_and_a_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object) -> int:
        raise TypeError("unsupported operand")  # a loraforge bug, not the user's input

    monkeypatch.setattr(cli, "_validate", broken)
    monkeypatch.setenv("LORAFORGE_LOG_DIR", str(tmp_path / "logs"))
    assert cli.main(["validate", str(DEMO_CONFIG)]) == 3
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "internal error (TypeError: unsupported operand); full traceback in " in err
    [log] = (tmp_path / "logs").iterdir()
    assert str(log) in err and "Traceback" in log.read_text() and "def broken" not in err


def test_user_errors_exit_1_and_interrupts_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    assert cli.main(["validate", str(DEMO_CONFIG), "train.r=0"]) == 1
    monkeypatch.setattr(cli, "_validate", interrupted)
    assert cli.main(["validate", str(DEMO_CONFIG)]) == 130


def test_validate_into_a_closed_pipe_is_quiet() -> None:
    command = f"{sys.executable} -m loraforge.flows.cli validate {DEMO_CONFIG} | true; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(command,
                            shell=True, executable="/bin/bash", cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0 and result.stderr == ""


def test_validate_finds_an_unwritable_store_and_gguf_types_that_are_never_made(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="store: cannot write artifacts to /proc/x"):
        cli._validate(cli._parser().parse_args(["validate", str(DEMO_CONFIG), "store=/proc/x"]))
    with pytest.raises(ConfigError) as error:
        load_config(DEMO_CONFIG, ["quantize.types=[f16]", "publish.include_gguf=[f16,q4_k_m]"])
    assert "publish.include_gguf: ['q4_k_m'] not made by the quantize stage" in str(error.value)


def test_an_override_error_names_the_override_not_a_line_of_the_file() -> None:
    with pytest.raises(ConfigError) as error:
        load_config(DEMO_CONFIG, ["quantize.types=[q3_x]"])
    assert "override 'quantize.types=[q3_x]': quantize.types.0" in str(error.value)
    assert f"{DEMO_CONFIG}:" not in str(error.value)


def test_an_empty_or_binary_config_file_says_so(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing yet\n"[:1])
    with pytest.raises(ConfigError, match=r"empty.yaml:1: the file is empty"):
        load_config(empty)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: x\ndata:\n  train_file: \xff\xfe.jsonl\n")
    with pytest.raises(ConfigError, match=r"binary.yaml:3: not UTF-8 text \(byte 0xff\)"):
        load_config(binary)


def test_a_hung_tool_is_stopped_at_its_timeout(tmp_path: Path) -> None:
    from loraforge.tasks.quantize import _run_tool

    started = time.time()
    with pytest.raises(
        StageError, match=r"llama-quantize failed: .* did not finish within quantize.tool_timeout_s=0.5 s"
    ):
        _run_tool([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "out.gguf",
                  "llama-quantize failed", 0.5)  # fmt: skip
    assert time.time() - started < 10


def test_a_failing_converter_stops_the_ones_running_beside_it(tmp_path: Path) -> None:
    from loraforge.tasks.quantize import _side_by_side, _ToolRun

    hung = _ToolRun([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "a.gguf", "base conversion")
    broken = _ToolRun([sys.executable, "-c", "import sys; print('no tensors'); sys.exit(3)"], tmp_path / "b.gguf",
                      "adapter conversion failed")  # fmt: skip
    writes = _ToolRun([sys.executable, "-c", "open('c.gguf', 'w').write('GGUF')"], tmp_path / "c.gguf", "c")
    started = time.time()
    with pytest.raises(StageError, match=r"adapter conversion failed \(exit 3\):\nno tensors"):
        _side_by_side([hung, broken, writes], tmp_path, timeout=120)  # the hung one listed first
    assert time.time() - started < 10  # killed with the failure, not waited for
    _side_by_side([writes, writes], tmp_path, timeout=120)  # all succeed: no error
    assert (tmp_path / "c.gguf").read_text() == "GGUF"
