"""Where the Hub is and how to talk about it safely: shared by eval (published comparison), publish and pull."""

from __future__ import annotations

import os

DEFAULT_ENDPOINT = "https://huggingface.co"


def hub_endpoint(explicit: str | None = None) -> str:
    """The Hub URL: the one given, else HF_ENDPOINT, else huggingface.co (no trailing slash)."""
    return (explicit or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token() -> str | None:
    """HF_TOKEN from the environment, or None."""
    return os.environ.get("HF_TOKEN") or None


def scrub(text: str, token: str | None) -> str:
    """The text with the token masked, for error messages and logs."""
    return text.replace(token, "***") if token else text
