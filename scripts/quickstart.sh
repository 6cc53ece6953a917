#!/usr/bin/env bash
# Install what is needed, then run the quickstart: distillation vs training from scratch on CPU.
# Extra arguments go to `distill quickstart` (e.g. --fast, --out DIR).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/setup.sh"
cd "$root"
exec distill quickstart "$@"
