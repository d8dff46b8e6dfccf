"""What `containers/build.sh` says it built: the container tier's tests read the tag and revision from its last line."""

from __future__ import annotations

import re

# build.sh's last line: "done in N s (tag <HEAD's sha>[-dirty], revision <last packaged commit>[-dirty]); ..."
_BUILT = re.compile(r"\(tag ([^,\s]+), revision ([^)\s]+)\)")


def built_tag(stdout: str) -> tuple[str, str]:
    """The (tag, revision) a build.sh run printed."""
    match = _BUILT.search(stdout)
    assert match, stdout
    return match.group(1), match.group(2)
