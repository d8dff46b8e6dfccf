"""The local stack's secrets (infra/stack/secrets.sh, used by infra/stack/up.sh): the Hub token is made from
/dev/urandom once and kept with mode 0600, `.stack/env` is written 0600, and up.sh has no fixed default token
and passes none on a command line."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UP = ROOT / "infra" / "stack" / "up.sh"


def _bash(script: str, *args: str) -> str:
    source = f"source {ROOT / 'infra' / 'stack' / 'secrets.sh'}; {script}"
    return subprocess.run(["bash", "-euo", "pipefail", "-c", source, "bash", *args], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def test_the_secret_is_made_once_and_kept_private(tmp_path: Path) -> None:
    secret = tmp_path / "hub-token"
    first = _bash('stack_secret "$1"', str(secret))
    assert re.fullmatch(r"[0-9a-f]{64}", first)  # 32 random bytes
    assert secret.stat().st_mode & 0o777 == 0o600
    assert _bash('stack_secret "$1"', str(secret)) == first  # a restart keeps it
    assert _bash('stack_secret "$1"', str(tmp_path / "other")) != first
    secret.chmod(0o644)  # loosened by hand: tightened again
    assert _bash('stack_secret "$1"', str(secret)) == first and secret.stat().st_mode & 0o777 == 0o600


def test_the_env_file_is_written_private(tmp_path: Path) -> None:
    env = tmp_path / "env"
    env.write_text("export HF_TOKEN=old\n")
    env.chmod(0o644)  # as an older up.sh left it
    _bash('printf "export HF_TOKEN=new\\n" | write_private "$1"', str(env))
    assert env.read_text() == "export HF_TOKEN=new\n" and env.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["env"]  # no temporary file left


def test_up_sh_has_no_fixed_token_and_keeps_it_off_command_lines() -> None:
    text = UP.read_text()
    assert 'HUB_TOKEN="${STACK_HUB_TOKEN:-hf_$(stack_secret "$STACK_DIR/hub-token")}"' in text
    assert not re.search(r"hf_[A-Za-z0-9_]{8,}", text)  # no literal token anywhere
    assert "--token" not in text  # the server reads LORAFORGE_HUB_TOKEN: a command line is readable by all (ps)
    assert 'LORAFORGE_HUB_TOKEN="$HUB_TOKEN" start hub' in text
    assert 'write_private "$STACK_DIR/env" <<EOF' in text and 'cat >"$STACK_DIR/env"' not in text
