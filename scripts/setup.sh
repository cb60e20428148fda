#!/usr/bin/env bash
# Create .venv and install the suite with its pinned dependencies.
# Idempotent: a second run only checks a stamp and returns in a second.
# --test: also install Debian's headless Chromium (best effort) for the report.html browser test.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--test" ] && [ ! -x /usr/bin/chromium ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "setup: could not install chromium with apt-get; the report browser test will be skipped" >&2
fi
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# torch first, pinned, so that nothing else pulls a different build.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 2> >(grep -v "is ignored" >&2)
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' 2> >(grep -v "is ignored" >&2)
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "setup: installed into $VENV"
