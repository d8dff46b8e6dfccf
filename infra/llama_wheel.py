"""Put llama.cpp's shared libraries, built once by infra/bootstrap.sh, into the llama-cpp-python wheel.

    python infra/llama_wheel.py WHEEL LIBDIR OUTDIR

WHEEL is llama-cpp-python built from its sdist with `-DLLAMA_BUILD=OFF` (its Python code, no llama.cpp); LIBDIR
holds libllama and libggml* from the one llama.cpp build of that same sdist, which also made llama-imatrix and
llama-quantize. The result, in OUTDIR, is the wheel pip installs: the libraries under llama_cpp/lib/ (where
llama_cpp loads them), each under every name the build gave it (libllama.so, .so.0, .so.0.5.0: a wheel holds no
links), RECORD rewritten with their sha256, tagged for this platform. Standard library only.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sys
import sysconfig
import zipfile
from pathlib import Path

LIBRARIES = re.compile(r"^lib(llama|ggml|ggml-base|ggml-cpu)\.so(\.\d+)*$")  # what llama_cpp loads, and their needs


def add_libraries(wheel: Path, libdir: Path, outdir: Path) -> Path:
    """The wheel with the libraries added under llama_cpp/lib/; returns its path in `outdir`."""
    libraries = sorted(p for p in libdir.iterdir() if LIBRARIES.match(p.name))
    if not any(p.name == "libllama.so" for p in libraries):
        raise SystemExit(f"llama_wheel: no libllama.so in {libdir}: the llama.cpp build did not finish")
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    name, version = wheel.name.split("-")[:2]
    target = outdir / f"{name}-{version}-py3-none-{platform}.whl"
    partial = target.with_name(f".{target.name}.partial")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as out:
        record_name = next(n for n in source.namelist() if n.endswith(".dist-info/RECORD"))
        records = [line for line in source.read(record_name).decode().splitlines() if line]
        records = [r for r in records if not r.startswith(f"{record_name},")]  # written last, without a hash
        for info in source.infolist():
            if info.filename == record_name:
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/WHEEL"):  # the tag: platform-specific now
                data = re.sub(rb"(?m)^Tag: .*$", f"Tag: py3-none-{platform}".encode(), data)
                records = [r for r in records if not r.startswith(f"{info.filename},")] + [_record(info.filename, data)]
            out.writestr(info, data)
        for library in libraries:
            arcname = f"llama_cpp/lib/{library.name}"
            data = library.read_bytes()
            info = zipfile.ZipInfo(arcname, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o755 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            out.writestr(info, data)
            records = [r for r in records if not r.startswith(f"{arcname},")] + [_record(arcname, data)]
        out.writestr(record_name, "\n".join([*records, f"{record_name},,"]) + "\n")
    partial.replace(target)
    return target


def _record(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    print(add_libraries(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
