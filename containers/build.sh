#!/usr/bin/env bash
# Builds loraforge's images with podman from a locally debootstrapped Debian: no registry is needed.
#
#   containers/build.sh                  the base and every stage image (data train eval merge quantize publish)
#   containers/build.sh train publish    only these (and the base they start from)
#   containers/build.sh train-cuda       the GPU train image: PyPI's CUDA torch, pins from constraints-cuda.txt
#   containers/build.sh serve            `loraforge serve` (docs/serve.md): peft and llama.cpp backends
#   make images                          the same as the first line (IMAGES="train-cuda" for the GPU image)
#
# Images: localhost/loraforge-{base-deps,base,data,train,eval,merge,quantize,publish}, each tagged with the git
# sha (12 hex; "-dirty" appended when the tree has uncommitted changes under flows/ tasks/ containers/ or the
# pins) and `latest`; train-cuda is localhost/loraforge-train tagged <sha>-cuda and latest-cuda (built on
# localhost/loraforge-base-deps-cuda: base-deps with the CUDA pin set). Idempotent: when every image already carries this build's context hash (a label over the
# source, the Containerfiles, the wheels and the build arguments) nothing is built (~2 s); when the `latest` one
# does (a commit that changed only docs or tests), it is tagged with the new sha, not built (a build with every
# layer cached took ~2.5 s of podman per image); otherwise podman's layer cache rebuilds only what changed (a
# source edit: the last two layers of each image). The OCI revision label is the last commit that changed what the
# images are built from (the source, the pins, the Containerfiles, the entrypoint, this script), so an image
# tagged again still names its source.
#
# Needs (as root on a clean Debian/Ubuntu: `apt-get install podman runc debootstrap`, done here when missing):
#   podman (4.3.1 tested) with runc; debootstrap the first time; `make setup` done (the llama-cpp-python wheel
#   and the GGUF converter in $LORAFORGE_CACHE); the torch 2.13.0 CPU wheel (found through pip's config, or
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu); PyPI reachable for the other wheels.
#
# Environment:
#   LORAFORGE_CACHE   cache folder (default ~/.cache/loraforge): the Debian rootfs tarball and the build context
#   DEBIAN_MIRROR     for debootstrap (default http://deb.debian.org/debian)
#   TORCH_INDEX_URL   an extra index for the CPU torch wheel (https://download.pytorch.org/whl/cpu); not used
#                     by train-cuda, whose torch (`torch===2.13.0` in constraints-cuda.txt) comes from PyPI
#   IMAGE_TAG         tag instead of the git sha
#   CA_BUNDLE         CA bundle pip trusts inside builds (default: the host's /etc/ssl/certs/ca-certificates.crt)
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${LORAFORGE_CACHE:-$HOME/.cache/loraforge}"
WORK="$CACHE/containers"
LLAMA_CPP_VERSION=0.3.36
TORCH_VERSION=2.13.0
DEBIAN_IMAGE=localhost/loraforge-debian:bookworm
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
EXTRA_IMAGES=(train-cuda serve) # built only when named: several GB of CUDA wheels; the adapter server (not a stage)
PODMAN=(containers/podman.sh)
VENV_PY="${LORAFORGE_VENV:-.venv}/bin/python"
mapfile -t ALL_STAGES < <("$VENV_PY" -m loraforge.tasks.registry) # one image per runnable stage (tasks/registry.py)
[ ${#ALL_STAGES[@]} -gt 0 ] || { echo "[images] error: no stages from $VENV_PY -m loraforge.tasks.registry" >&2; exit 1; }
log() { echo "[images] $*"; }
die() { echo "[images] error: $*" >&2; exit 1; }

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=("${ALL_STAGES[@]}")
for s in "${stages[@]}"; do
  [[ " ${ALL_STAGES[*]} ${EXTRA_IMAGES[*]} " == *" $s "* ]] \
    || die "unknown image '$s'; images: ${ALL_STAGES[*]} ${EXTRA_IMAGES[*]}"
done

# --- tools ---------------------------------------------------------------------------------------------------
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${need[*]} (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null; }
  else
    die "missing ${need[*]}: as root, apt-get install podman runc debootstrap"
  fi
fi
mkdir -p "$WORK"
exec 9>"$WORK/build.lock"
flock 9 # one build at a time per cache (CI jobs, tests and people share it)

# --- the Debian base: debootstrap once, podman import ---------------------------------------------------------
if ! "${PODMAN[@]}" image exists "$DEBIAN_IMAGE"; then
  tarball="$WORK/debian-bookworm.tar"
  if [ ! -f "$tarball" ]; then
    # debian-archive-keyring: debootstrap checks bookworm's signatures with it (not preinstalled on Ubuntu).
    if ! command -v debootstrap >/dev/null || [ ! -f /usr/share/keyrings/debian-archive-keyring.gpg ]; then
      [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
        || die "missing debootstrap: as root, apt-get install debootstrap debian-archive-keyring"
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap debian-archive-keyring >/dev/null \
        || { apt-get update -q >/dev/null \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap debian-archive-keyring >/dev/null; }
    fi
    [ "$(id -u)" = 0 ] || die "debootstrap needs root"
    rootfs="$WORK/debian-bookworm.rootfs"
    if [ ! -x "$rootfs/usr/bin/python3" ]; then
      log "debootstrap bookworm (minbase + python3) from $DEBIAN_MIRROR into $rootfs (~2-3 min, once)"
      rm -rf "$rootfs"
      debootstrap --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates,libgomp1,libstdc++6 \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
        || { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed (log: $WORK/debootstrap.log)"; }
    fi
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar --numeric-owner -C "$rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$rootfs"
  fi
  log "podman import $tarball -> $DEBIAN_IMAGE"
  "${PODMAN[@]}" import -q --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$DEBIAN_IMAGE" >/dev/null
fi

# --- the build context: source, wheels, converter -------------------------------------------------------------
ctx="$WORK/context"
mkdir -p "$ctx/wheels" "$ctx/llama.cpp"
# Only what the images run: the package, its metadata and the pins (no tests, docs, .venv or artifacts).
new_src="$ctx/src.new"
rm -rf "$new_src" && mkdir -p "$new_src"
git ls-files -co --exclude-standard -- pyproject.toml constraints.txt constraints-cuda.txt README.md LICENSE loraforge flows tasks \
  | while IFS= read -r f; do { [ -f "$f" ] || [ -L "$f" ]; } && printf '%s\n' "$f"; done \
  | tar -cf - -T - | tar -xf - -C "$new_src"
rm -rf "$ctx/src" && mv "$new_src" "$ctx/src"
cp containers/entrypoint.sh "$ctx/entrypoint.sh"
# The images' pins: constraints.txt restricted to loraforge's runtime dependency closure (as installed in the
# venv), without torch (each image installs its own build). Dev-only pins (pytest, linters, the Docker worker)
# then never invalidate the image layers. The CUDA set (constraints-image-cuda.txt, for train-cuda): the same
# closure from constraints-cuda.txt, plus torch's CUDA build and the CUDA libraries only that set pins.
[ -x "$VENV_PY" ] || die "no $VENV_PY: run make setup first"
"$VENV_PY" - constraints.txt "$ctx/constraints-image.txt.part" constraints-cuda.txt "$ctx/constraints-image-cuda.txt.part" <<'PY'
import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

closure, todo = set(), ["loraforge"]
while todo:
    name = canonicalize_name(todo.pop())
    if name in closure:
        continue
    closure.add(name)
    try:
        requires = md.distribution(name).requires or []
    except md.PackageNotFoundError:
        continue
    for line in requires:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            todo.append(req.name)
closure -= {"loraforge", "torch"}


def pins(path):
    with open(path) as src:
        return {canonicalize_name(line.split("=")[0].strip()): line for line in src if line.strip()[:1] not in ("", "#")}


cpu, cuda = pins(sys.argv[1]), pins(sys.argv[3])
with open(sys.argv[2], "w") as out:
    out.write("# constraints.txt restricted to loraforge's runtime dependencies, torch aside (containers/build.sh)\n")
    out.writelines(line for name, line in cpu.items() if name in closure)
with open(sys.argv[4], "w") as out:
    out.write("# constraints-cuda.txt restricted to the same, with torch's CUDA build and its CUDA libraries\n")
    out.writelines(line for name, line in cuda.items() if name in closure or name == "torch" or name not in cpu)
PY
mv "$ctx/constraints-image.txt.part" "$ctx/constraints-image.txt"
mv "$ctx/constraints-image-cuda.txt.part" "$ctx/constraints-image-cuda.txt"
CUDA_TORCH_SPEC=$(grep -m1 '^torch===' constraints-cuda.txt) || die "constraints-cuda.txt pins no torch===: make constraints"

torch_wheel=$(ls "$ctx/wheels"/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null | head -1 || true)
if [ -z "$torch_wheel" ]; then
  log "fetching the torch $TORCH_VERSION CPU wheel into the build context (pip's config finds it on disk)"
  "$VENV_PY" -m pip download -q --no-deps -d "$ctx/wheels" "torch==$TORCH_VERSION+cpu" \
    ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
    || die "no torch $TORCH_VERSION CPU wheel: set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu"
fi
llama_wheel=$(ls "$CACHE/wheels"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -1 || true)
[ -n "$llama_wheel" ] || die "no llama-cpp-python $LLAMA_CPP_VERSION wheel in $CACHE/wheels: run make setup first"
cmp -s "$llama_wheel" "$ctx/wheels/$(basename "$llama_wheel")" || cp -p "$llama_wheel" "$ctx/wheels/"  # a rebuilt wheel replaces its namesake
converter="$CACHE/llama.cpp-$LLAMA_CPP_VERSION"
[ -f "$converter/convert_hf_to_gguf.py" ] || die "no GGUF converter in $converter: run make setup first"
rm -rf "$ctx/llama.cpp" && mkdir -p "$ctx/llama.cpp"
cp -a "$converter" "$ctx/llama.cpp/"
[ -d "$converter-tools" ] && cp -a "$converter-tools" "$ctx/llama.cpp/"

# --- tags, build arguments, the context hash ------------------------------------------------------------------
# The tag is HEAD's sha; the revision label names the last commit that changed what the images are built from
# (a commit that changes only docs or tests gets the images of the one before it, tagged again: no build).
packaged=(loraforge flows tasks pyproject.toml constraints.txt constraints-cuda.txt README.md LICENSE
  'containers/*.Containerfile' containers/entrypoint.sh containers/build.sh)
sha=$(git rev-parse --short=12 HEAD 2>/dev/null || echo nogit)
revision=$(git log -1 --format=%H -- "${packaged[@]}" 2>/dev/null | cut -c1-12)
revision=${revision:-$sha}
if [ -n "$(git status --porcelain -- "${packaged[@]}" 2>/dev/null)" ]; then
  sha="$sha-dirty"
  revision="$revision-dirty"
fi
TAG="${IMAGE_TAG:-$sha}"
# OCI labels: the version and licenses from pyproject.toml; the source repository from OCI_SOURCE, else the
# GitHub Actions repository, else the git remote `origin` (a local path when the clone has no remote).
read -r VERSION LICENSES < <("$VENV_PY" -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print(p["version"], p["license"])')
SOURCE_URL="${OCI_SOURCE:-}"
[ -z "$SOURCE_URL" ] && [ -n "${GITHUB_REPOSITORY:-}" ] && SOURCE_URL="${GITHUB_SERVER_URL:-https://github.com}/$GITHUB_REPOSITORY"
[ -z "$SOURCE_URL" ] && SOURCE_URL=$(git remote get-url origin 2>/dev/null || true)
[ -z "$SOURCE_URL" ] && SOURCE_URL="file://$PWD"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
common=(--network host --pull=never --layers)
if [ -f "$CA_BUNDLE" ]; then
  common+=(-v "$CA_BUNDLE:/etc/ssl/certs/loraforge-host-ca.crt:ro" --build-arg PIP_CERT=/etc/ssl/certs/loraforge-host-ca.crt)
fi
cpu_torch=() # the CPU images' torch index (train-cuda takes PyPI's torch)
[ -n "${TORCH_INDEX_URL:-}" ] && cpu_torch+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
hash=$({
  (cd "$ctx" && find src llama.cpp entrypoint.sh constraints-image*.txt -type f -print0 | sort -z | xargs -0 sha256sum)
  (cd "$ctx/wheels" && ls -l --time-style=+ -- *.whl | awk '{print $5, $NF}')
  sha256sum containers/*.Containerfile
  echo "${TORCH_INDEX_URL:-} $revision $VERSION $LICENSES $SOURCE_URL"
} | sha256sum | cut -c1-16)

current() { # the image is there with this build's context hash
  [ "$("${PODMAN[@]}" image inspect --format '{{ index .Labels "loraforge.context" }}' "$1" 2>/dev/null)" = "$hash" ]
}

build() { # NAME FILE TAGS... -- EXTRA ARGS...
  local name=$1 file=$2; shift 2
  local tags=() extra=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do tags+=(-t "localhost/loraforge-$name:$1"); shift; done
  [ $# -gt 0 ] && shift
  extra=("$@")
  # base-deps is an intermediate target (podman keeps its first label): current when base, built on it, is.
  local probe="localhost/loraforge-$name:${tags[1]##*:}" before="localhost/loraforge-$name:${tags[3]##*:}"
  local judge=$before
  [ "$name" = base-deps ] && "${PODMAN[@]}" image exists "$probe" && probe="localhost/loraforge-base:${tags[1]##*:}"
  [ "$name" = base-deps ] && judge="localhost/loraforge-base:${tags[3]##*:}"
  [ "$name" = base-deps-cuda ] && judge="localhost/loraforge-train:${tags[3]##*:}-cuda"
  if current "$probe"; then
    log "loraforge-$name:${tags[1]##*:} is up to date"
    return
  fi
  # The image of the same context under its second tag (latest): tagged again, not built.
  if [ "${tags[1]}" != "$before" ] && "${PODMAN[@]}" image exists "$before" && current "$judge"; then
    "${PODMAN[@]}" tag "$before" "${tags[1]}"
    log "loraforge-$name:${tags[1]##*:} is loraforge-$name:${tags[3]##*:} (the same context: tagged, not built)"
    return
  fi
  log "building loraforge-$name (containers/$file)"
  local started=$SECONDS
  "${PODMAN[@]}" build "${common[@]}" "${extra[@]}" \
    --label "loraforge.context=$hash" --label "org.opencontainers.image.revision=$revision" \
    --label "org.opencontainers.image.source=$SOURCE_URL" --label "org.opencontainers.image.version=$VERSION" \
    --label "org.opencontainers.image.licenses=$LICENSES" --label "org.opencontainers.image.title=loraforge-$name" \
    -f "containers/$file" "${tags[@]}" "$ctx" >"$WORK/build-$name.log" 2>&1 \
    || { tail -30 "$WORK/build-$name.log"; die "building loraforge-$name failed (log: $WORK/build-$name.log)"; }
  log "loraforge-$name:${tags[1]##*:} built in $((SECONDS - started)) s"
}

started=$SECONDS
build base-deps base.Containerfile "$TAG" latest -- --target deps --build-arg "BASE_IMAGE=$DEBIAN_IMAGE"
build base base.Containerfile "$TAG" latest -- --build-arg "BASE_IMAGE=$DEBIAN_IMAGE"
for stage in "${stages[@]}"; do
  case "$stage" in
    publish) build publish publish.Containerfile "$TAG" latest -- --build-arg "BASE=localhost/loraforge-base:$TAG" ;;
    train-cuda)
      # base-deps with the CUDA pin set as /opt/loraforge/constraints-image.txt, then train.Containerfile as is:
      # its torch step installs torch===2.13.0 (the local +cpu wheel never matches ===) and the nvidia-* pins.
      if ! current "localhost/loraforge-train:$TAG-cuda"; then
        build base-deps-cuda base.Containerfile "$TAG" latest -- --target deps-cuda --build-arg "BASE_IMAGE=$DEBIAN_IMAGE"
      fi
      build train train.Containerfile "$TAG-cuda" latest-cuda -- \
        --build-arg "BASE=localhost/loraforge-base-deps-cuda:$TAG" --build-arg "TORCH_SPEC=$CUDA_TORCH_SPEC"
      ;;
    *) build "$stage" "$stage.Containerfile" "$TAG" latest -- "${cpu_torch[@]}" \
         --build-arg "BASE=localhost/loraforge-base-deps:$TAG" ;;
  esac
done
log "done in $((SECONDS - started)) s (tag $TAG, revision $revision); sizes also in $WORK/sizes-$TAG.tsv:"
"${PODMAN[@]}" images --filter "reference=localhost/loraforge-*:$TAG*" --format '{{.Repository}}:{{.Tag}}	{{.Size}}' \
  | sort | tee "$WORK/sizes-$TAG.tsv" | sed 's/^/  /'
