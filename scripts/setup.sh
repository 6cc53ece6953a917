#!/usr/bin/env bash
# Create .venv (once) and install distill with its test tools into it. Safe to run again: it only
# reinstalls when pyproject.toml changed. Source it (`. scripts/setup.sh`) to get the venv activated.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DISTILL_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv"
  "$py" -m venv "$venv"
fi
stamp="$venv/.distill-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing dependencies (CPU build of torch)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  # Pinned here: an unpinned torch would pull a multi-GB CUDA build. pyproject.toml keeps a range.
  "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
  "$venv/bin/python" -m pip install --quiet -e "$root[dev]"
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
