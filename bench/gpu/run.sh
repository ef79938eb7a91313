#!/usr/bin/env bash
# The one command a lent GPU machine runs (docs/gpu.md has the exact device-tool call):
#
#     bash bench/gpu/run.sh [--only a,d] [--budget SECONDS]   # on the GPU machine, with .whl/ carried
#     bash bench/gpu/run.sh --cpu-smoke                       # here: the same steps on the CPU, tiny shapes
#
# 1. Installs the carried wheels (.whl/, made by `make gpu-wheels`) that the machine lacks into a temporary
#    folder with pip --no-index --no-deps (bench/gpu/wheels.py decides which), never touching torch.
# 2. Puts that folder and this repository first on PYTHONPATH: ftclip runs from the source tree, not installed.
# 3. Runs bench/gpu/run.py: versions, then steps a-d, each timed and in its own process, within the budget
#    (460 s by default: the whole command stays under eight minutes with the install). Results: $OUT
#    (default ./gpu-results): gpu-results.md, gpu-results.json, gpu-log.txt. Exit 0 only if every step passed.
#
# The CPU smoke run uses whatever the calling Python has (PYTHON, default python3) and no carried wheels.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$REPO/gpu-results}
mkdir -p "$OUT"

smoke=0
for argument in "$@"; do
    [ "$argument" = "--cpu-smoke" ] && smoke=1
done

site=""
if [ "$smoke" = 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/ftclip-gpu-site.XXXXXX)
    started=$(date +%s)
    if "$PYTHON" bench/gpu/wheels.py install .whl "$site"; then
        echo "carried wheels installed in $site ($(( $(date +%s) - started )) s)"
    else
        echo "warning: installing the carried wheels failed; the steps run with what the machine has"
    fi
elif [ "$smoke" = 0 ]; then
    echo "warning: no carried wheels in .whl/ (make gpu-wheels, and carry .whl): bitsandbytes, datasets and pydantic may be missing"
fi

export FTCLIP_GPU_SITE="$site"
export PYTHONPATH="${site:+$site:}$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
# Nothing here is downloaded, and the GPU machine reaches no network: a hub call would only wait for a timeout.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} HF_HUB_DISABLE_TELEMETRY=1
exec "$PYTHON" bench/gpu/run.py --out "$OUT" "$@"
