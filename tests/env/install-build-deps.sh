#!/usr/bin/env bash
# What building the workspace needs from Debian (bindgen for RocksDB needs libclang).
source "$(dirname "$0")/lib.sh"
apt_install libclang-dev pkg-config openssl curl python3-venv
