"""llama.cpp's converter scripts run in processes forked from a warm one.

A fresh `python convert_hf_to_gguf.py ...` spends ~4 s of CPU importing torch, transformers (the parts that
AutoConfig and AutoTokenizer load lazily included), gguf-py and the converter's own `conversion` package before it
reads a byte of the model (measured on the tiny test model's f16 conversion: 4.7 s of CPU for a fresh process,
0.9 s of wall time for a child forked from a process that has imported them). A quantize run starts
one to three converter runs, a sweep or an in-process pipeline run many: each process that converts keeps one
server (this file run as a script, started at its first conversion) that imports those modules once and forks a
child per run. The child is the converter run as `python SCRIPT ARGS` would run it: its own working folder,
environment, `sys.argv` and `sys.path[0]` (the script's folder), stdout and stderr to a log file, its exit code
the script's. It is killed like any process (`WarmRun.kill`), by pid.

Modules read some settings once, when imported (OpenMP's thread count, the Hugging Face cache folders): the
server is started with the environment of the run that needs it and a run whose such settings differ
(`IMPORT_TIME_PREFIXES`) gets a new server; the previous one ends when its running children have.

Protocol (JSON lines): the client writes {"id", "args", "cwd", "env", "log"}; the server answers {"id", "pid"}
once it has forked, and {"pid", "code"} when that child has ended. The server ends when its stdin closes (the
client process ended) and its children have ended; when it is killed instead, the client kills the children it
had not heard the end of and reports them killed (-9).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

# Imported once by the server: what every converter run imports before it starts working. transformers imports
# its parts lazily: AutoConfig/AutoTokenizer.from_pretrained (every run reads the config and the vocabulary) pull
# in its model-config, activation and tokenizer modules, which import torch's compiler and distributed tensors
# (1.4 s of CPU per run when not preloaded: 2.15 s -> 0.79 s for the tiny model's f16 conversion).
PRELOAD = ("torch", "transformers", "numpy", "safetensors", "gguf", "conversion", "transformers.utils.type_validators",
           "transformers.models.auto.configuration_auto", "transformers.models.auto.tokenization_auto")  # fmt: skip
# Environment variables read when the preloaded modules are imported: a run with other values gets its own server.
IMPORT_TIME_PREFIXES = ("OMP_", "MKL_", "KMP_", "TORCH", "PYTORCH_", "CUDA_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_",
                        "TOKENIZERS_", "PYTHON", "NO_LOCAL_GGUF", "LD_")  # fmt: skip


class WarmRun:
    """One converter run started by a server: `wait` for its exit code, `kill` it."""

    def __init__(self, server: _Server, pid: int) -> None:
        self.server, self.pid = server, pid

    def wait(self, timeout: float | None = None) -> int | None:
        """The run's exit code (negative: killed by that signal), or None when `timeout` seconds passed first."""
        return self.server.exit_code(self.pid, timeout)

    def kill(self) -> None:
        if self.server.exit_code(self.pid, 0) is None:
            with contextlib.suppress(ProcessLookupError):  # ended in between
                os.kill(self.pid, 9)


def start(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> WarmRun:
    """Start `python *args` (a script and its arguments, or `-c CODE`) in a child of a warm server, in `cwd`, with
    `env` as its environment and its output in `log`."""
    return _server_for(env).start(args, cwd, env, log)


_current: _Server | None = None  # one warm server at a time
_current_lock = threading.Lock()


def _server_for(env: dict[str, str]) -> _Server:
    global _current
    settings = tuple(sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)))
    with _current_lock:
        if _current is None or _current.settings != settings or not _current.alive():
            if _current is not None:
                _current.close()  # it ends when its running children have
            _current = _Server(env, settings)
        return _current


class _Server:
    """The client side of one server process."""

    def __init__(self, env: dict[str, str], settings: tuple[tuple[str, str], ...]) -> None:
        self.settings = settings  # the import-time settings it was started with
        cmd = [sys.executable, __file__, *PRELOAD]
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd="/")
        self._ids = itertools.count()
        self._changed = threading.Condition()
        self._pids: dict[int, int] = {}  # request id -> pid, until `start` takes it
        self._started: set[int] = set()  # every pid this server forked for this client
        self._codes: dict[int, int] = {}  # pid -> exit code
        self._ended = False
        threading.Thread(target=self._read, name="converter-server", daemon=True).start()

    def start(self, args: list[str], cwd: Path, env: dict[str, str], log: Path) -> WarmRun:
        from loraforge.tasks.errors import StageError

        with self._changed:
            number = next(self._ids)
            request = {"id": number, "args": args, "cwd": str(cwd), "env": env, "log": str(log)}
            assert self.process.stdin is not None
            try:
                self.process.stdin.write(json.dumps(request).encode() + b"\n")
                self.process.stdin.flush()
            except BrokenPipeError:
                self._ended = True
            self._changed.wait_for(lambda: number in self._pids or self._ended)
            if number not in self._pids:
                raise StageError(f"the converter server (python {__file__}) ended before starting "
                                 f"{Path(args[0]).name}: exit {self.process.poll()}; its errors are above")  # fmt: skip
            return WarmRun(self, self._pids.pop(number))

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        with self._changed:  # every pid gets its code, the server's end included (`_read`)
            self._changed.wait_for(lambda: pid in self._codes, timeout)
            return self._codes.get(pid)

    def alive(self) -> bool:
        return not self._ended and self.process.poll() is None

    def close(self) -> None:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            message = json.loads(line)
            with self._changed:
                if "id" in message:
                    self._pids[message["id"]] = message["pid"]
                    self._started.add(message["pid"])
                else:
                    self._codes[message["pid"]] = message["code"]
                self._changed.notify_all()
        self.process.wait()
        with self._changed:
            # A server that ended on its own has no child left; one that was killed or crashed leaves its running
            # children unreported: they are killed here (none may outlive the runs that wait on them) and so said.
            for pid in self._started - self._codes.keys():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
                self._codes[pid] = -9
            self._ended = True
            self._changed.notify_all()


# --- the server (this file run as a script: stdlib only, nothing from loraforge) ---------------------------------


def _serve(preload: list[str]) -> None:
    import importlib
    import selectors
    import signal

    del sys.path[0]  # this file's folder (tasks/): its modules (evaluate.py, data.py, ...) must shadow nothing
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the client, which kills the runs it started
    global _answers
    _answers = os.dup(1)  # the answers' pipe; stdout joins stderr, so that nothing a module prints lands in it
    os.dup2(2, 1)
    for name in preload:
        with contextlib.suppress(Exception):  # then each child imports it (and fails) as a fresh process would
            importlib.import_module(name)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ, "requests")
    selector.register(wake_r, selectors.EVENT_READ, "ended")
    running: set[int] = set()
    pending, reading = b"", True
    while reading or running:
        for key, _ in selector.select():
            if key.data == "ended":
                os.read(wake_r, 4096)
                _reap(running)
                continue
            chunk = os.read(0, 1 << 16)
            if not chunk:
                reading = False
                selector.unregister(0)
                continue
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request, (wake_r, wake_w, _answers))
                running.add(pid)
                _answer({"id": request["id"], "pid": pid})
        _reap(running)


def _reap(running: set[int]) -> None:
    while running:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        running.discard(pid)
        _answer({"pid": pid, "code": os.waitstatus_to_exitcode(status)})


_answers = 1


def _answer(message: dict[str, Any]) -> None:
    os.write(_answers, json.dumps(message).encode() + b"\n")


def _child(request: dict[str, Any], server_fds: tuple[int, ...]) -> None:
    """Run the request as `python *args` would, then end this process with its exit code (never returns)."""
    import io
    import runpy
    import signal
    import traceback

    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for fd in server_fds:
            os.close(fd)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        args = request["args"]
        if args[0] == "-c":
            sys.argv = ["-c", *args[2:]]
            sys.path.insert(0, "")
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(args)
            sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
            runpy.run_path(args[0], run_name="__main__")
        code = 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported as the interpreter would, exit 1
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


if __name__ == "__main__":
    _serve(sys.argv[1:])
