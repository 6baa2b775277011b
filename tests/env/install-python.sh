#!/usr/bin/env bash
# A virtualenv with the Helm v4 SDK (PyPI helm-python-sdk), boto3 and pytest for the tests
# that drive Helm and S3 from Python. Cached in $WEIR_CACHE/venv-<hash of the pins>.
source "$(dirname "$0")/lib.sh"
pins="helm-python-sdk==0.2.2 boto3==1.40.* pytest==8.* pyyaml==6.* confluent-kafka==2.16.1"
venv=$WEIR_CACHE/venv-$(printf '%s' "$pins" | sha256sum | cut -c1-12)
if [ -x "$venv/bin/python" ] && [ -f "$venv/.complete" ]; then
  echo "$venv"; exit 0
fi
apt_install python3-venv >/dev/null 2>&1 || true
log "creating $venv ($pins)"
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC2086
"$venv/bin/pip" install -q --disable-pip-version-check $pins >&2
touch "$venv/.complete"
echo "$venv"
