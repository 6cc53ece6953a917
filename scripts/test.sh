#!/usr/bin/env bash
# Install what is needed, then run the whole test suite (offline, CPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/setup.sh"
cd "$root"
exec python -m pytest -q "$@"
