"""S3-compatible object storage under an artifact store (`store: s3://bucket/prefix`), through boto3.

Credentials and the endpoint come from the standard AWS settings, never from a config: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY` (or a profile / instance role), `AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3` for an
S3-compatible server (MinIO, Ceph, R2, `rclone serve s3`), `AWS_REGION`. Transfers are retried with exponential
backoff by botocore (`standard` mode, `LORAFORGE_S3_ATTEMPTS` attempts, default 8); large files go up as
multipart uploads, which S3 never shows as an object until the last part is in (a killed upload leaves nothing).

Only names relative to the store's prefix cross this module's interface: `ObjectStore("s3://b/p").get("x")`
reads `s3://b/p/x`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from loraforge.tasks.errors import StageError

SETTINGS_HINT = (
    "Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), AWS_ENDPOINT_URL for an S3-compatible "
    "server, and AWS_REGION; nothing secret goes in the config."
)


@dataclass(frozen=True)
class Listed:
    """One object under the store's prefix: its name relative to the prefix, size and modification time."""

    name: str
    size: int
    modified: float


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes at either end) of `s3://bucket[/prefix]`.

    Raises:
        StageError: no bucket, or credentials written into the URL.
    """
    parsed = urlparse(url)
    problems = []
    if not parsed.hostname:
        problems.append("it names no bucket (s3://BUCKET/PREFIX)")
    if parsed.username or parsed.password:
        problems.append("it carries credentials: take them out (they would end up in manifests and run records)")
    if parsed.query or parsed.fragment:
        problems.append("it has a query or fragment (?...#...), which an S3 store does not use")
    if problems:
        shown = url.replace(parsed.netloc, f"***@{parsed.hostname}") if parsed.username or parsed.password else url
        raise StageError(f"store: {shown!r}: {'; '.join(problems)}. {SETTINGS_HINT}")
    return parsed.hostname or "", parsed.path.strip("/")


class ObjectStore:
    """Objects under `s3://bucket/prefix`, addressed by names relative to the prefix."""

    def __init__(self, url: str) -> None:
        """Open (lazily: no request until the first use) the bucket prefix at `url`."""
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client: Any = None

    @property
    def endpoint(self) -> str:
        """The server the requests go to (AWS when no endpoint is set)."""
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"

    def client(self) -> Any:
        """The boto3 S3 client (one per store object), with retries and path-style addressing for custom
        endpoints (most S3-compatible servers do not serve bucket subdomains)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            custom = self.endpoint != "AWS S3"
            config = Config(
                retries={"total_max_attempts": int(os.environ.get("LORAFORGE_S3_ATTEMPTS", "8")), "mode": "standard"},
                s3={"addressing_style": "path" if custom else "auto"},
                connect_timeout=10,
                read_timeout=120,
            )
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
            self._client = boto3.session.Session().client("s3", region_name=region, config=config)
        return self._client

    def key(self, name: str) -> str:
        """The object key of `name` in the bucket."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def get(self, name: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        with self._errors(f"read {name}", missing_ok=True):
            body = self.client().get_object(Bucket=self.bucket, Key=self.key(name))["Body"]
            return bytes(body.read())
        return None

    def put(self, name: str, data: bytes) -> None:
        """Write a whole object in one request (atomic: readers see the old object or the new one)."""
        with self._errors(f"write {name}"):
            self.client().put_object(Bucket=self.bucket, Key=self.key(name), Body=data)

    def size(self, name: str) -> int | None:
        """The object's size, or None when it does not exist."""
        with self._errors(f"look up {name}", missing_ok=True):
            return int(self.client().head_object(Bucket=self.bucket, Key=self.key(name))["ContentLength"])
        return None

    def upload(self, name: str, path: Path) -> None:
        """Upload a file (multipart when large: the object appears only once every part is in)."""
        with self._errors(f"upload {path} to {name}"):
            self.client().upload_file(str(path), self.bucket, self.key(name))

    def download(self, name: str, path: Path) -> str | None:
        """Download an object to `path` (created or replaced); returns the sha256 of the bytes written, or None
        when there is no such object."""
        digest = hashlib.sha256()
        with self._errors(f"download {name}", missing_ok=True):
            body = self.client().get_object(Bucket=self.bucket, Key=self.key(name))["Body"]
            with path.open("wb") as handle:
                for chunk in iter(lambda: body.read(1 << 20), b""):
                    digest.update(chunk)
                    handle.write(chunk)
            return digest.hexdigest()
        return None

    def delete(self, name: str) -> None:
        """Remove an object (no error when it is already gone)."""
        with self._errors(f"delete {name}"):
            self.client().delete_object(Bucket=self.bucket, Key=self.key(name))

    def list(self, prefix: str = "") -> Iterator[Listed]:
        """Every object whose name starts with `prefix` (relative to the store's prefix), in name order."""
        base = self.key("")
        with self._errors(f"list {prefix or '/'}"):
            pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.key(prefix))
            for page in pages:
                for item in page.get("Contents", []):
                    yield Listed(item["Key"][len(base) :], int(item["Size"]), item["LastModified"].timestamp())

    @contextlib.contextmanager
    def _errors(self, action: str, missing_ok: bool = False) -> Iterator[bool]:
        """Turn the client's failures into a StageError that names the store, the object and the settings;
        with `missing_ok`, a missing object or bucket ends the block quietly instead."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield True
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if missing_ok and code in ("NoSuchKey", "404", "NotFound"):
                return
            raise StageError(self._explain(action, code, str(exc))) from None
        except BotoCoreError as exc:
            raise StageError(self._explain(action, type(exc).__name__, str(exc))) from None

    def _explain(self, action: str, code: str, detail: str) -> str:
        hint = {
            "NoSuchBucket": f"create the bucket {self.bucket!r} first (or fix the store URL).",
            "InvalidAccessKeyId": SETTINGS_HINT,
            "SignatureDoesNotMatch": SETTINGS_HINT,
            "AccessDenied": "the credentials may not do this on the bucket: check their policy.",
            "NoCredentialsError": SETTINGS_HINT,
            "EndpointConnectionError": "is the server running and AWS_ENDPOINT_URL right?",
        }.get(code, SETTINGS_HINT)
        return f"store {self.url} ({self.endpoint}): cannot {action}: {code}: {detail.splitlines()[0][:300]}. {hint}"
