#!/usr/bin/env bash
# `make container`, after `make build`: the image of the newest grok3d Bento in $BENTOML_HOME, built by podman from
# the Dockerfile BentoML generates (`bentoml containerize --backend podman`), on
#   - python:3.11-slim, the base that Dockerfile names, where a registry serves it (CONTAINER_BASE=standard), or
#   - Debian bookworm made here without a registry (CONTAINER_BASE=local, deploy/container/base.sh);
# CONTAINER_BASE=auto (the default) takes the standard base when it can be pulled, else the local one.
# The CA certificates of this host (/usr/local/share/ca-certificates) are added to either (host-cas.Containerfile).
# A Bento with torch's CPU build (make build TORCH=cpu) gets TORCH_WHEELS, the folder holding that wheel, mounted
# read-only at /wheels during the build; its image is tagged <bento tag>-cpu.
# Prints the image reference alone on its last line; everything else goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=deploy/container
base_choice=${CONTAINER_BASE:-auto}
wheels=${TORCH_WHEELS:-/opt/wheels}
standard=docker.io/library/python:3.11-slim
say() { echo "make container: $*" >&2; }

case $base_choice in
    standard | auto)
        if podman image exists "$standard" || timeout 300 podman pull -q "$standard" >/dev/null; then
            base=$standard
        elif [ "$base_choice" = standard ]; then
            say "cannot pull $standard (CONTAINER_BASE=local makes a base without a registry)"; exit 1
        else
            say "no registry serves $standard here: using a Debian bookworm base made with mmdebstrap"
            base=$($here/base.sh)
        fi ;;
    local) base=$($here/base.sh) ;;
    *) say "CONTAINER_BASE must be auto, standard or local, not '$base_choice'"; exit 2 ;;
esac

cas=$(find /usr/local/share/ca-certificates -name '*.crt' -type f 2>/dev/null | sort)
if [ -n "$cas" ]; then
    key=$({ podman image inspect --format '{{.Id}}' "$base"; cat $here/host-cas.Containerfile $cas; } | sha256sum | cut -c1-12)
    trusting=localhost/grok3d-base:cas-$key
    if ! podman image exists "$trusting"; then
        context=$(mktemp -d)
        trap 'rm -rf "$context"' EXIT
        cp -r /usr/local/share/ca-certificates "$context/cas"
        podman build --quiet --layers=false --build-arg "BASE=$base" -f $here/host-cas.Containerfile \
            -t "$trusting" "$context" >/dev/null
    fi
    for old in $(podman images --format '{{.Repository}}:{{.Tag}}' --filter 'reference=localhost/grok3d-base:cas-*'); do
        [ "$old" = "$trusting" ] || podman rmi "$old" >/dev/null 2>&1 || true  # layers stay while images use them
    done
    base=$trusting
fi
say "base image $base"

read -r bento models < <(.venv/bin/python -c 'import bentoml
b = bentoml.get("grok3d:latest")
print(b.tag, ",".join(str(m.tag) for m in b.info.all_models) or "-")')
bento_path=$(.venv/bin/bentoml get "$bento" -o path)
if [ "$models" = - ]; then
    say "the Bento $bento packs no TripoSR model (TRIPOSR_MODEL=${TRIPOSR_MODEL:-triposr:latest} is not in the" \
        "model store; make import-model first): its image will answer 503 to POST /api/generate"
fi
requirements=$bento_path/env/python/requirements.txt
options=(--opt "from=$base")
image=localhost/$bento
cpu_torch=$(sed -n 's/^torch==\(.*+cpu\)$/\1/p' "$requirements")
if [ -n "$cpu_torch" ]; then
    if ! compgen -G "$wheels/torch-$cpu_torch-cp311-*.whl" > /dev/null; then
        say "this Bento wants torch $cpu_torch: put its wheel (https://download.pytorch.org/whl/cpu) in a folder" \
            "and name it with TORCH_WHEELS= (now '$wheels')"
        exit 1
    fi
    options+=(--opt "volume=$(realpath "$wheels"):/wheels:ro")
    image=$image-cpu
fi
.venv/bin/bentoml containerize --backend podman "${options[@]}" -t "$image" "$bento" >&2
echo "$image"
