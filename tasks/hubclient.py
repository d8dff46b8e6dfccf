"""Where the Hub is and how to talk about it safely: shared by eval (published comparison), publish and pull.

Tokens come from the environment (HF_TOKEN) or from a Prefect Secret block named in the config; they are only
ever handed to huggingface_hub, never stored, printed or written, and `scrub` masks them in error messages.
"""

from __future__ import annotations

import os
from typing import Any

from tasks.errors import StageError

DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_endpoint(explicit: str | None = None) -> str:
    """The Hub URL: the one given, else HF_ENDPOINT, else huggingface.co (no trailing slash)."""
    return (explicit or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token(secret_block: str | None = None) -> str | None:
    """The Hub token: from the Prefect Secret block named `secret_block` when one is named, else HF_TOKEN from the
    environment, else None.

    Raises:
        StageError: the named Secret block cannot be loaded (the message names it, never a value).
    """
    if not secret_block:
        return os.environ.get("HF_TOKEN") or None
    from prefect.blocks.system import Secret

    try:
        block: Any = Secret.load(secret_block, _sync=True)  # type: ignore[call-arg]  # sync even under a loop
    except Exception as exc:  # no such block, no Prefect API reachable, a block of another type
        raise StageError(
            f"publish.token_secret: cannot load the Prefect Secret block {secret_block!r} ({type(exc).__name__}); "
            f"create it (`prefect block create secret` or Secret(value=...).save({secret_block!r})) or unset "
            "publish.token_secret to use HF_TOKEN."
        ) from None
    value = block.get()
    if not isinstance(value, str) or not value:
        raise StageError(f"publish.token_secret: the Secret block {secret_block!r} holds no token string.")
    return value


def scrub(text: str, token: str | None) -> str:
    """The text with the token masked, for error messages and logs."""
    return text.replace(token, "***") if token else text
