#!/usr/bin/env bash
# Creates .venv-ref: Python 3.12 with DeepMind's `gemma` library, the reference that
# tests/test_orbax_parity.py compares our checkpoint loader and model against.
#
# gemma 4.x needs Python >= 3.12 and pulls tensorflow; pip backtracks for minutes on that
# dependency tree, uv installs it in under a minute. The versions are the ones the tests were
# run with (tests/reference/requirements.txt, a `uv pip freeze` of gemma==4.0.1).
# Idempotent: does nothing when .venv-ref was already built from the same requirements.
# From scratch: ~40 s and ~3.1 GB (tensorflow-cpu alone is 260 MB to download), PyPI only.
set -euo pipefail

PROJECT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REFERENCE_VENV:-$PROJECT_DIR/.venv-ref}"
REQUIREMENTS="$PROJECT_DIR/tests/reference/requirements.txt"
UV_VERSION="0.13.9"
STAMP="$VENV/.requirements.sha256"
WANTED="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANTED" ]]; then
  echo "setup_reference_env: $VENV is up to date"
  exit 0
fi

# A Python 3.12: REFERENCE_PYTHON, PATH, or pyenv's. uv must not download one (only PyPI is
# reachable), and pyenv puts shims on PATH that exist but cannot run, so each is tried.
find_python312() {
  local candidate
  for candidate in "${REFERENCE_PYTHON:-}" "$(command -v python3.12 || true)" \
      "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
      /root/.pyenv/versions/3.12*/bin/python3.12; do
    if [[ -n "$candidate" && -x "$candidate" ]] && "$candidate" -c \
        "import sys; sys.exit(sys.version_info[:2] != (3, 12))" 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
PYTHON312="$(find_python312)" || {
  echo "setup_reference_env: no Python 3.12 found (PATH, pyenv); set REFERENCE_PYTHON" >&2
  exit 1
}

start=$SECONDS
rm -rf "$VENV"
"$PYTHON312" -m venv "$VENV"
# uv from PyPI into the venv itself, so the script needs nothing installed beforehand.
"$VENV/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"
UV_PYTHON_DOWNLOADS=never "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" \
  -r "$REQUIREMENTS"
"$VENV/bin/python" -c "import gemma; print('setup_reference_env: gemma', gemma.__version__)"
echo "$WANTED" > "$STAMP"
echo "setup_reference_env: $VENV ready in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1)"
