#!/usr/bin/env bash
# Installs Garage, the S3-compatible object store the tests run against, from crates.io.
# Cached in $WEIR_CACHE/garage-<version>; does nothing when the binary is there.
source "$(dirname "$0")/lib.sh"
bin=$GARAGE_DIR/bin/garage
if [ -x "$bin" ]; then log "garage $GARAGE_VERSION: cached in $GARAGE_DIR"; exit 0; fi
apt_install pkg-config libssl-dev
log "cargo install garage@$GARAGE_VERSION (about 11 minutes on 2 cores)"
tmp=$WEIR_CACHE/garage-build
cargo install --locked --quiet "garage@$GARAGE_VERSION" --root "$GARAGE_DIR.tmp" --target-dir "$tmp"
rm -rf "$GARAGE_DIR"; mv "$GARAGE_DIR.tmp" "$GARAGE_DIR"; rm -rf "$tmp"
log "garage installed: $bin"
