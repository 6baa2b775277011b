#!/usr/bin/env bash
# A virtualenv with PyFlink (apache-flink on PyPI), the peer Weir's benchmarks measure against.
# The wheel carries Flink's distribution jars (mini-cluster, RocksDB state backend, datagen and
# blackhole connectors); it needs Java 17. It lacks an S3 file system and the Kafka connector:
# those come from Maven Central, as tests/env/flink/pom.xml lists them, and go into the wheel's
# distribution (site-packages/pyflink, which PyFlink takes as FLINK_HOME):
#  - flink-s3-fs-hadoop into plugins/s3-fs-hadoop/ (Flink loads each plugins/ folder in a class
#    loader of its own), so checkpoints and savepoints go to s3://bucket/... through Flink's own
#    S3 file system (bench/flink_s3.py configures it; the pom says why not the presto one);
#  - flink-connector-kafka, kafka-clients and what they need into lib/, on the class path of
#    every PyFlink job (so no script has to name them in pipeline.jars).
# Cached in $WEIR_CACHE/venv-flink-<version>: `.complete` marks the pip install, and
# `.jars-<hash of the pom>` the jars of that pom, so a venv without them (or with another
# pom's) is completed, not taken as it is. Maven's repository is $WEIR_CACHE/m2.
# Prints the venv's path on stdout (logs go to stderr).
source "$(dirname "$0")/lib.sh"
FLINK_VERSION=2.3.0
pom=$(cd "$(dirname "$0")" && pwd)/flink/pom.xml
venv=$WEIR_CACHE/venv-flink-$FLINK_VERSION
jars=$(sha256sum "$pom" | cut -c1-12)
marker=$venv/.jars-$jars
if [ -x "$venv/bin/python" ] && [ -f "$venv/.complete" ] && [ -f "$marker" ]; then
  log "flink $FLINK_VERSION with the jars of tests/env/flink/pom.xml ($jars): cached in $venv"
  echo "$venv"; exit 0
fi
# took START WHAT: logs how long WHAT took since START ($SECONDS).
took() { log "$2: $((SECONDS - $1)) s"; }
all=$SECONDS

t=$SECONDS
command -v java >/dev/null 2>&1 || apt_install openjdk-17-jre-headless
command -v mvn >/dev/null 2>&1 || apt_install maven
apt_install python3-venv >/dev/null 2>&1 || true
took "$t" "java, maven and python3-venv present"

if [ -x "$venv/bin/python" ] && [ -f "$venv/.complete" ]; then
  log "pip: apache-flink==$FLINK_VERSION already in $venv"
else
  t=$SECONDS
  log "creating $venv (apache-flink==$FLINK_VERSION, about 840 MB)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "apache-flink==$FLINK_VERSION" >&2
  touch "$venv/.complete"
  took "$t" "pip install apache-flink==$FLINK_VERSION"
fi
home=$("$venv/bin/python" -c 'import os, pyflink; print(os.path.dirname(os.path.abspath(pyflink.__file__)))')
[ -d "$home/lib" ] || { log "no lib/ in $home: not the layout this script knows"; exit 1; }

# Jars of an earlier pom: out, as its list says (nothing else of the distribution is touched).
for old in "$venv"/.jars-*; do
  [ -f "$old" ] || continue
  while IFS= read -r f; do rm -f "$home/$f"; done <"$old"
  rm -f "$old"
done
find "$home/plugins" -mindepth 1 -type d -empty -delete 2>/dev/null || true

t=$SECONDS
stage=$venv/.jars-stage
rm -rf "$stage"
log "mvn: the jars of $pom (repository $WEIR_CACHE/m2)"
# (Maven 3.8 prints colour resets even with -B -q: taken out.)
mvn -q -B -f "$pom" -Dmaven.repo.local="$WEIR_CACHE/m2" -Dstage="$stage" \
  dependency:copy-dependencies@s3-plugin dependency:copy-dependencies@lib 2>&1 |
  sed -e 's/\x1b\[[0-9;]*m//g' -e '/^[[:space:]]*$/d' >&2
took "$t" "mvn dependency:copy-dependencies"

t=$SECONDS
list=$(cd "$stage" && find lib plugins -type f -name '*.jar' | sort)
[ -n "$list" ] || { log "mvn copied no jars into $stage"; exit 1; }
installed=()
while IFS= read -r f; do
  # A jar the wheel has itself stays the wheel's (and is not listed, so never removed).
  if [ -e "$home/$f" ]; then log "  $f: the distribution has it already"; continue; fi
  mkdir -p "$home/$(dirname "$f")"
  mv "$stage/$f" "$home/$f"
  installed+=("$f")
  log "  $home/$f"
done <<<"$list"
rm -rf "$stage"
printf '%s\n' "${installed[@]}" >"$marker"
took "$t" "jars installed into $home"
took "$all" "flink $FLINK_VERSION with the jars of tests/env/flink/pom.xml ($jars) in $venv"
echo "$venv"
