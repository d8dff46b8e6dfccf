"""Where the Hub is and how to talk about it safely: shared by data, eval (published comparison), publish and pull.

Tokens come from a Prefect Secret block named in the config, else from huggingface_hub's own lookup (HF_TOKEN,
then the token `hf auth login` stored); they are only ever handed to huggingface_hub, never stored, printed or
written, never sent over plain http except to loopback, and `scrub` masks them in error messages.
Failures are explained (`explain`): what went wrong at which endpoint and what to fix; a transient one (the Hub
unreachable, a 5xx, a 429) is retried a few times with backoff first (`with_retries`), unless huggingface_hub
already retried it for longer than the whole schedule.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from loraforge.tasks.errors import StageError

DEFAULT_ENDPOINT = "https://huggingface.co"
LINEAGE_FILE = "loraforge/lineage.json"
# Seconds to wait before each retry of a transient failure: four tries over about 13 s.
RETRY_DELAYS: tuple[float, ...] = (1.0, 3.0, 9.0)
# A try that itself took longer than this failed after huggingface_hub's own retries (its uploads, LFS batches and
# commits retry a Hub that does not answer for ~23 s, `http_backoff`): it is not tried again, which would multiply
# them (a push to a Hub that died mid-upload took 105 s to fail instead of ~25 s; a re-run resumes the push).
SLOW_TRY_S = 10.0
LOGIN_FIX = "check HF_TOKEN / `hf auth login` (or the Prefect Secret block named by publish.token_secret)"
SHA256 = re.compile(r"[0-9a-f]{64}")
REPO_ID = r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+"  # what the Hub accepts as a repo id (owner/name)
REPO_ID_RULE = "owner/name, letters digits . _ - only"
T = TypeVar("T")


def hub_endpoint(explicit: str | None = None) -> str:
    """The Hub URL: the one given, else HF_ENDPOINT, else huggingface.co (no trailing slash)."""
    return (explicit or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token(secret_block: str | None = None, endpoint: str | None = None) -> str | None:
    """The Hub token: from the Prefect Secret block named `secret_block` when one is named, else from
    huggingface_hub's lookup (HF_TOKEN, then the token saved by `hf auth login`), else None.

    Args:
        secret_block: name of a Prefect Secret block holding the token (publish.token_secret).
        endpoint: where the token is about to be sent; when given, a token is refused for plain http to anything
            but loopback (`check_transport`).

    Raises:
        StageError: the named Secret block cannot be loaded, huggingface_hub's lookup fails, or the token would
            go over plain http to a host that is not loopback (the messages never hold the token).
    """
    token = _secret_token(secret_block) if secret_block else _login_token()
    if endpoint is not None:
        check_transport(endpoint, token)
    return token


def _login_token() -> str | None:
    from huggingface_hub import get_token

    try:
        return get_token() or None
    except Exception as exc:  # e.g. HF_OIDC_RESOURCE is set and the token exchange failed
        raise StageError(
            f"cannot get a Hub token from huggingface_hub ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "set HF_TOKEN, run `hf auth login`, or fix the OIDC settings (HF_OIDC_RESOURCE)."
        ) from None


def _secret_token(secret_block: str) -> str:
    from prefect.blocks.system import Secret

    try:
        block: Any = Secret.load(secret_block, _sync=True)  # type: ignore[call-arg]  # sync even under a loop
    except Exception as exc:  # no such block, no Prefect API reachable, a block of another type
        raise StageError(
            f"publish.token_secret: cannot load the Prefect Secret block {secret_block!r} ({type(exc).__name__}); "
            f"create it (`prefect block create secret` or Secret(value=...).save({secret_block!r})) or unset "
            "publish.token_secret to use HF_TOKEN or `hf auth login`."
        ) from None
    value = block.get()
    if not isinstance(value, str) or not value:
        raise StageError(f"publish.token_secret: the Secret block {secret_block!r} holds no token string.")
    return value


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP address, IPv6 with or without brackets) is this machine's loopback."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8, ::1
    except ValueError:
        return False


def check_transport(endpoint: str, token: str | None) -> None:
    """Refuse to send a token anywhere but over https, or over plain http to loopback.

    Raises:
        StageError: a token is set and the endpoint is plain http (or no URL) on a host that is not loopback.
    """
    if not token:
        return
    parts = urlsplit(endpoint)
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname or "")):
        return
    raise StageError(
        f"refusing to send the Hub token to {endpoint}: only https:// (or plain http to loopback: 127.0.0.0/8, "
        "::1, localhost) keeps it from being read on the way. Set the endpoint (HF_ENDPOINT or the stage's "
        "endpoint setting) to its https:// URL, or reach the server through a loopback tunnel "
        "(`ssh -L 8765:HOST:8765 ...`, then http://127.0.0.1:8765)."
    )


def scrub(text: str, token: str | None) -> str:
    """The text with the token masked, for error messages and logs."""
    return text.replace(token, "***") if token else text


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a failed Hub call (looking through wrapped causes), None when there was no answer."""
    seen: BaseException | None = exc
    while seen is not None:
        status = getattr(getattr(seen, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        seen = seen.__cause__
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether trying again may help: no answer (connection refused or reset, timeout), a 5xx or a 429."""
    status = http_status(exc)
    if status is not None:
        return status >= 500 or status == 429
    seen: BaseException | None = exc
    while seen is not None:  # httpx, httpx2 and requests name theirs like the builtins
        names = {cls.__name__ for cls in type(seen).__mro__}
        if names & {"TransportError", "ConnectionError", "TimeoutError", "Timeout", "TimeoutException"}:
            return True
        seen = seen.__cause__
    return False


def with_retries(
    call: Callable[[], T], what: str, delays: tuple[float, ...] | None = None, tries: list[int] | None = None
) -> T:
    """`call()`, tried again after each of `delays` seconds (default RETRY_DELAYS) while it fails transiently.

    Args:
        call: the Hub call to make.
        what: what is being done, for the log line of each retry (e.g. "resolving org/name at http://...").
        delays: seconds to wait before each retry.
        tries: when given, its one item is set to the number of tries made (for the failure's message).

    Returns:
        What `call` returned. The last failure is raised unchanged when every try failed, or at once when it is
        not transient (`is_transient`) or the try took longer than SLOW_TRY_S (the client retried it already).
    """
    waits = RETRY_DELAYS if delays is None else delays
    for attempt, wait in enumerate((*waits, None), start=1):
        if tries is not None:
            tries[0] = attempt
        started = time.monotonic()
        try:
            return call()
        except Exception as exc:
            if wait is None or not is_transient(exc):
                raise
            status = http_status(exc)
            if (took := time.monotonic() - started) > SLOW_TRY_S:
                print(f"[hub] {what}: {status or type(exc).__name__} (try {attempt}) after {took:.0f} s of "
                      "huggingface_hub's own retries; not tried again")  # fmt: skip
                raise
            print(f"[hub] {what}: {status or type(exc).__name__} (try {attempt}); trying again in {wait:g} s")
            time.sleep(wait)
    raise AssertionError("unreachable")  # the loop returns or raises


def explain(exc: BaseException, endpoint: str, token: str | None, tries: int = 1) -> str:
    """What a failed Hub call means and how to fix it, in one line, scrubbed of the token.

    Args:
        exc: the failure, as huggingface_hub raised it.
        endpoint: the Hub URL that was called.
        token: the token that was sent (None: none), to say whether one was and to mask it.
        tries: how many times the call was made (said for transient failures).
    """
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    status = http_status(exc)
    detail = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, token)
    after = f" after {tries} tries" if tries > 1 else ""
    if isinstance(exc, GatedRepoError):
        return (
            f"the repo is gated at {endpoint} ({status}): accept its conditions on the Hub with the account of "
            f"the token, then {LOGIN_FIX}"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"no such revision at {endpoint} ({status}): check the tag, branch or commit after '@'"
    if isinstance(exc, RepositoryNotFoundError):
        sent = "with the token sent" if token else "and no token was sent (a private repo looks the same)"
        return (
            f"{endpoint} knows no such repo ({status}) {sent}: check the repo id; a private repo needs a token "
            f"that can read it: {LOGIN_FIX}"
        )
    if status == 401:
        if not token:
            return f"{endpoint} asks for a token (401) and none was found: set HF_TOKEN or run `hf auth login`"
        return f"the Hub at {endpoint} refused the token (401: invalid or expired): {LOGIN_FIX}"
    if status == 403:
        return (
            f"the Hub at {endpoint} refused access with this token (403: it lacks the permission, e.g. a "
            f"read-only or fine-grained token without this repo): {LOGIN_FIX}"
        )
    if status is not None and status >= 500:
        return f"the Hub at {endpoint} failed with a server error ({status}){after}: try again later ({detail})"
    if status == 429:
        return f"the Hub at {endpoint} is rate-limiting this client (429){after}: try again later"
    if is_transient(exc):
        return (
            f"cannot reach {endpoint}{after} ({type(exc).__name__}: {detail}): check HF_ENDPOINT / the endpoint "
            "setting and the network"
        )
    return f"{endpoint} answered {status or 'with an error'} ({type(exc).__name__}: {detail})"


def read_lineage(path: Path, where: str) -> dict[str, Any]:
    """A repo's loraforge/lineage.json, checked for what readers rely on.

    Args:
        path: the downloaded lineage file.
        where: the repo and commit it came from, for the message (e.g. "pull org/name (org/name@0123abcd)").

    Returns:
        The lineage: a JSON object whose `pipeline` and `tag` are strings, `files` maps each published path to
        its sha256, and `train` and `base_model` are objects.

    Raises:
        StageError: the file is not JSON, or keys are missing or of the wrong type (every problem listed).
    """
    fix = "republish the version (`loraforge stage publish CONFIG`) or use another revision"
    try:
        lineage = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StageError(f"{where}: {LINEAGE_FILE} is not valid JSON ({exc}); {fix}.") from None
    if not isinstance(lineage, dict):
        raise StageError(f"{where}: {LINEAGE_FILE} holds a {type(lineage).__name__}, not a JSON object; {fix}.")
    problems = []
    for key, kind, name in (("pipeline", str, "a string"), ("tag", str, "a string"), ("files", dict, "an object"),
                            ("train", dict, "an object"), ("base_model", dict, "an object")):  # fmt: skip
        if key not in lineage:
            problems.append(f"no {key!r}")
        elif not isinstance(lineage[key], kind):
            problems.append(f"{key!r} is {type(lineage[key]).__name__}, not {name}")
    files = lineage.get("files")
    if isinstance(files, dict):
        bad = [str(k) for k, v in files.items() if not isinstance(v, str) or not SHA256.fullmatch(v)]
        problems += [f"'files' entry {name!r} is not a sha256 hex digest" for name in bad[:5]]
    if problems:
        raise StageError(f"{where}: {LINEAGE_FILE} is malformed ({'; '.join(problems)}); {fix}.")
    return lineage
