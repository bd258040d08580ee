#!/usr/bin/env bash
# Pin the Dockerfile's base image by digest: rewrite `FROM rayproject/ray:<tag>` (or an older
# `<tag>@sha256:...`) as `FROM rayproject/ray:<tag>@sha256:<digest of that tag now>`, so every
# build gets the same bytes even if the tag is moved. Run it where Docker Hub is reachable
# (the machines of this project reach only package registries), review the diff, commit it.
# Rerun it to move to a new base tag (edit the tag first) or to take a rebuilt one on purpose.
#
#   bash scripts/pin_base_image.sh                  # asks Docker Hub's registry API
#   bash scripts/pin_base_image.sh sha256:<64 hex>  # a digest read elsewhere, e.g. from
#       docker buildx imagetools inspect rayproject/ray:<tag> --format '{{json .Manifest.Digest}}'
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dockerfile="${DOCKERFILE:-$repo_root/Dockerfile}"

from_line="$(grep -E '^FROM rayproject/ray:' "$dockerfile" || true)"
[[ -n "$from_line" ]] || { echo "pin_base_image: no 'FROM rayproject/ray:<tag>' in $dockerfile" >&2; exit 1; }
reference="${from_line#FROM }"
reference="${reference%% *}"
tag="${reference#rayproject/ray:}"
tag="${tag%%@*}"

if [[ $# -ge 1 ]]; then
    digest="$1"
else
    # The digest of the tag's manifest list (all platforms), as `docker pull` resolves it.
    token="$(curl -fsSL "https://auth.docker.io/token?service=registry.docker.io&scope=repository:rayproject/ray:pull" \
             | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')"
    digest="$(curl -fsSI -H "Authorization: Bearer $token" \
                -H "Accept: application/vnd.oci.image.index.v1+json" \
                -H "Accept: application/vnd.docker.distribution.manifest.list.v2+json" \
                -H "Accept: application/vnd.docker.distribution.manifest.v2+json" \
                "https://registry-1.docker.io/v2/rayproject/ray/manifests/$tag" \
              | tr -d '\r' | awk -F': ' 'tolower($1) == "docker-content-digest" { print $2 }')"
fi
if [[ ! "$digest" =~ ^sha256:[0-9a-f]{64}$ ]]; then
    echo "pin_base_image: '$digest' is not a sha256 digest (sha256:<64 hex>)" >&2
    exit 1
fi

pinned="rayproject/ray:$tag@$digest"
sed -i "s|^FROM $reference|FROM $pinned|" "$dockerfile"
echo "pin_base_image: $dockerfile now starts FROM $pinned"
