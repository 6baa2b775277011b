#!/usr/bin/env bash
# Installs Garage, the S3-compatible object store the tests run against, from crates.io.
# Cached in $WEIR_CACHE/garage-<version>; does nothing when the binary is there.
source "$(dirname "$0")/lib.sh"
bin=$GARAGE_DIR/bin/garage
if [ -x "$bin" ]; then log "garage $GARAGE_VERSION: cached in $GARAGE_DIR"; exit 0; fi
apt_install pkg-config libssl-dev
# Only what the tests use: the S3 API, the SQLite metadata engine and the admin API's /health
# (not behind "metrics"). Without LMDB, K2V, metrics and OpenTelemetry, and at opt-level 1,
# the build takes about half the time of the default one.
log "cargo install garage@$GARAGE_VERSION, S3 and SQLite only (several minutes on 2 cores)"
tmp=$WEIR_CACHE/garage-build
CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_DEBUG=0 \
  cargo install --locked --quiet "garage@$GARAGE_VERSION" --no-default-features --features "$GARAGE_FEATURES" \
  --root "$GARAGE_DIR.tmp" --target-dir "$tmp"
rm -rf "$GARAGE_DIR"; mv "$GARAGE_DIR.tmp" "$GARAGE_DIR"; rm -rf "$tmp"
log "garage installed: $bin"
