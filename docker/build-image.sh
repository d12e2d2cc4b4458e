#!/usr/bin/env bash
# Build normserve's image with podman where no image registry or package index is reachable from
# inside a build: `make image` (CPU) and `make image-gpu` run this.
#
#   docker/build-image.sh cpu [TAG] [MODEL_REPOSITORY]     # default tag normserve:cpu, repository model_repository
#   docker/build-image.sh gpu [TAG] [MODEL_REPOSITORY]
#   docker/build-image.sh haproxy [TAG]                    # the fleet's HAProxy, default tag normserve-haproxy
#   docker/build-image.sh env                               # print the podman environment, to `eval` before podman
#
# 1. podman, buildah, runc and mmdebstrap from apt where missing (as root);
# 2. podman's engine settings (docker/podman/containers.conf) and storage under NORMSERVE_PODMAN_DIR
#    (default ~/.cache/normserve/podman), so nothing of it lands in the project;
# 3. a Debian bookworm base (Python 3.11) made once with mmdebstrap and imported as
#    localhost/normserve-base:bookworm, cached outside the project;
# 4. the wheels the image installs, downloaded on the host into docker/wheels/ (ignored by git);
# 5. `podman build --network none --pull=never` of the Dockerfile's target, with those wheels only; its
#    request path is compiled on a second base made the same way with gcc and Python's headers
#    (localhost/normserve-compiler-base:bookworm: the same Debian Python, so the builds load in the first).
#
# HAProxy's image is the Dockerfile's haproxy target on a second base made the same way with Debian's haproxy
# in it (localhost/normserve-haproxy-base:bookworm), since apt-get cannot reach Debian inside a build here.
#
# The Dockerfile itself builds unchanged elsewhere (`docker build .`), from python:3.11-slim and PyPI.
# MODEL_REPOSITORY is a folder inside the project copied into the image as its /models (MODELS=copy),
# or "-" for none (MODELS=none: the repository is mounted at run time, as the container tests do).
# Exit status 3: podman cannot be installed or cannot run here (the tests skip on it, saying why).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${NORMSERVE_PODMAN_DIR:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/normserve/podman}
python=${PYTHON:-python3}  # 3.11 or newer (deps.py reads pyproject.toml with tomllib), with pip
base_image=localhost/normserve-base:bookworm
compiler_image=localhost/normserve-compiler-base:bookworm

podman_env() {
    mkdir -p "$cache/storage" "$cache/run"
    if [ ! -f "$cache/storage.conf" ]; then
        printf '[storage]\ndriver = "overlay"\ngraphroot = "%s/storage"\nrunroot = "%s/run"\n' "$cache" "$cache" \
            >"$cache/storage.conf"
    fi
    export CONTAINERS_CONF="$root/docker/podman/containers.conf"
    export CONTAINERS_STORAGE_CONF="$cache/storage.conf"
}

install_tools() {
    local missing=()
    for tool in podman buildah runc mmdebstrap; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "build-image: ${missing[*]} missing, and no apt-get as root to install them" >&2
        exit 3
    fi
    echo "build-image: installing ${missing[*]} with apt-get" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        podman buildah runc mmdebstrap uidmap >/dev/null; }; then
        echo "build-image: apt-get could not install ${missing[*]}" >&2
        exit 3
    fi
}

# podman installed is not podman usable (a container without cgroups or overlay, say): try it once.
check_podman() {
    local said
    if ! said=$(podman run --rm --network none --pull=never "$base_image" true 2>&1); then
        echo "build-image: podman cannot run a container here: $said" >&2
        exit 3
    fi
}

# base IMAGE NAME PACKAGES: a Debian bookworm image with PACKAGES, made once with mmdebstrap and cached.
base() {
    local image=$1 name=$2 packages=$3
    podman image exists "$image" && return
    local tarball="$cache/$name.tar"
    if [ ! -f "$tarball" ]; then
        echo "build-image: making the base image $image with mmdebstrap (about 2 minutes, once)" >&2
        mmdebstrap --quiet --variant=apt --include="$packages" bookworm "$cache/$name.partial.tar"
        mv "$cache/$name.partial.tar" "$tarball"
    fi
    podman import --quiet "$tarball" "$image" >/dev/null
}

wheels() {
    local groups=("$@")
    # Every manylinux tag bookworm's glibc (2.36) runs, so that pip picks the same wheels it would there.
    local platforms=()
    local platform
    for platform in manylinux2014_x86_64 manylinux_2_{17,24,26,27,28,31,34,35,36}_x86_64 linux_x86_64; do
        platforms+=(--platform "$platform")
    done
    # shellcheck disable=SC2046  # one requirement per line
    "$python" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
        --python-version 3.11 --implementation cp "${platforms[@]}" --constraint "$root/requirements.lock" \
        --constraint "$root/docker/gpu.lock" --dest "$root/docker/wheels" $("$python" "$root/docker/deps.py" "${groups[@]}")
}

case "${1:-}" in
    env)
        podman_env  # one variable a line, for `eval` and for readers that split lines
        printf "export CONTAINERS_CONF=%q\nexport CONTAINERS_STORAGE_CONF=%q\n" "$CONTAINERS_CONF" "$CONTAINERS_STORAGE_CONF"
        exit 0
        ;;
    cpu | gpu) target=$1 ;;
    haproxy)
        install_tools
        podman_env
        base "$base_image" base-bookworm python3,python3-venv,ca-certificates
        check_podman
        tag=${2:-normserve-haproxy}
        haproxy_base=localhost/normserve-haproxy-base:bookworm
        base "$haproxy_base" haproxy-bookworm haproxy,ca-certificates
        podman build --quiet --network none --pull=never --format docker --target haproxy \
            --build-arg BASE_IMAGE="$haproxy_base" --tag "$tag" "$root" >/dev/null
        echo "build-image: built $tag" >&2
        exit 0
        ;;
    *)
        echo "usage: $0 cpu|gpu [TAG] [MODEL_REPOSITORY] | haproxy [TAG] | env" >&2
        exit 2
        ;;
esac
tag=${2:-normserve:$target}
repository=${3:-model_repository}
if [ "$repository" = "-" ]; then
    models=(--build-arg MODELS=none)
elif [ -d "$root/$repository" ]; then
    models=(--build-arg MODELS=copy --build-arg MODEL_REPOSITORY="$repository")
else
    echo "build-image: no model repository at $root/$repository; run \`make models\` first, or pass - for none" >&2
    exit 2
fi

install_tools
podman_env
base "$base_image" base-bookworm python3,python3-venv,ca-certificates
base "$compiler_image" compiler-bookworm python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates
check_podman
wheels "$target" native
start=$(date +%s)
podman build --quiet --network none --pull=never --format docker --target "$target" \
    --build-arg BASE_IMAGE="$base_image" --build-arg BUILD_IMAGE="$compiler_image" \
    --build-arg PIP_INDEX=--no-index "${models[@]}" \
    --tag "$tag" "$root" >/dev/null
echo "build-image: built $tag in $(($(date +%s) - start)) s ($(podman image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec))" >&2
