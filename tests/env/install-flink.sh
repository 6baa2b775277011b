#!/usr/bin/env bash
# A virtualenv with PyFlink (apache-flink on PyPI), the peer Weir's benchmarks measure against.
# The wheel carries Flink's distribution jars (mini-cluster, RocksDB state backend, datagen and
# blackhole connectors); it needs Java 17. Cached in $WEIR_CACHE/venv-flink-<version>; prints
# the venv's path on stdout (logs go to stderr).
# Also s3fs (Debian's s3fs-fuse), through which the benchmark puts Flink's savepoints on the
# test S3 server: the wheel has no S3 file system, and Flink's S3 plugin jars are published
# only on Maven Central, which is not among the registries these machines reach.
source "$(dirname "$0")/lib.sh"
FLINK_VERSION=2.3.0
venv=$WEIR_CACHE/venv-flink-$FLINK_VERSION
apt_install s3fs
if [ -x "$venv/bin/python" ] && [ -f "$venv/.complete" ]; then
  echo "$venv"; exit 0
fi
if ! command -v java >/dev/null 2>&1; then
  apt_install openjdk-17-jre-headless
fi
apt_install python3-venv >/dev/null 2>&1 || true
log "creating $venv (apache-flink==$FLINK_VERSION, about 840 MB)"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "apache-flink==$FLINK_VERSION" >&2
touch "$venv/.complete"
echo "$venv"
