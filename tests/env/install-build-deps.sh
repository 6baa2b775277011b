#!/usr/bin/env bash
# What building and testing the workspace needs from Debian (bindgen for RocksDB needs
# libclang; librdkafka, built from source for the Kafka connectors, needs OpenSSL and zlib; the
# Argo CD health checks are tested with Lua 5.1, the dialect Argo CD runs).
source "$(dirname "$0")/lib.sh"
apt_install libclang-dev pkg-config openssl libssl-dev zlib1g-dev curl python3-venv lua5.1
