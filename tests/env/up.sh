#!/usr/bin/env bash
# Starts the test environment on 127.0.0.1 with free ports: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler (Kubernetes $K8S_VERSION, see lib.sh), a second
# kube-apiserver without the CRDs' CEL rules, Garage (S3), a three-broker Kafka cluster, and
# the node agent; writes
# $TESTENV_DIR/env.sh. Installs (and caches) what is missing first.
# Usage: tests/env/up.sh [TESTENV_DIR]   (default: target/testenv)
source "$(dirname "$0")/lib.sh"
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:-$root/target/testenv}
bin_dir=${WEIR_BIN_DIR:-${CARGO_TARGET_DIR:-$root/target}/debug}

if [ -f "$dir/env.sh" ]; then
  log "an environment is already up in $dir: run tests/env/down.sh first"; exit 1
fi
# What a failed start left behind.
bash "$(dirname "$0")/down.sh" "$dir"
bash "$(dirname "$0")/install-k8s.sh"
bash "$(dirname "$0")/install-garage.sh"
venv=$(bash "$(dirname "$0")/install-python.sh")
# The kubectl built with the apiserver, so that client and server agree.
export PATH=$K8S_DIR:$PATH
for b in weir-node; do
  [ -x "$bin_dir/$b" ] || { log "$bin_dir/$b is missing: run cargo build --workspace --bins first"; exit 1; }
done

rm -rf "$dir"; mkdir -p "$dir"/{pids,logs,pki,etcd,garage}
dir=$(cd "$dir" && pwd)
# The node's name also tags its block of /etc/hosts: environments that run at the same time
# need names of their own (WEIR_NODE_NAME), or each one's agent overwrites the other's block
# (and down.sh removes it).
node_name=${WEIR_NODE_NAME:-weir-node}
echo "$node_name" > "$dir/node-name"
# The node's state (pod volumes, logs, pulled images) must be reachable by pods that run as
# any user, wherever the checkout is: it lives under /var/tmp (or $WEIR_NODE_ROOT, e.g. a
# tmpfs), linked from $dir/node.
node_dir=${WEIR_NODE_ROOT:-/var/tmp}/weir-testenv-$(printf '%s' "$dir" | sha256sum | cut -c1-12)
rm -rf "$node_dir"; mkdir -p "$node_dir"; chmod 755 "$node_dir"
ln -s "$node_dir" "$dir/node"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
start() { # start NAME CMD...: in its own session, output to logs/NAME.log
  local name=$1; shift
  setsid "$@" >"$dir/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$dir/pids/$name.pid"
}
wait_for() { # wait_for WHAT SECONDS CMD...
  local what=$1 secs=$2; shift 2
  for _ in $(seq 1 $((secs * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "timed out waiting for $what"; exit 1
}
up_ok=0
trap '[ $up_ok = 1 ] || { log "env-up failed: logs in $dir/logs"; bash "$(dirname "$0")/down.sh" "$dir"; }' EXIT

etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port); norules_port=$(free_port)
s3_port=$(free_port); s3_rpc=$(free_port); s3_admin=$(free_port)
# A /16 of the loopback range for pods, different per environment.
net=$(( (RANDOM % 200) + 20 ))
pod_network="127.$net.0.0/16"

# --- PKI: a CA, the apiserver's serving certificate, the service-account key pair, a token.
pki=$dir/pki
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=weir-testenv-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n' > "$pki/san.ext"
openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 30 \
  -extfile "$pki/san.ext" -out "$pki/apiserver.crt" 2>/dev/null
openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
token=$(openssl rand -hex 24)
echo "$token,admin,admin,system:masters" > "$pki/tokens.csv"

# write_kubeconfig FILE USER TOKEN [PORT]: a kubeconfig for the apiserver (on PORT, by
# default the main one) with a bearer token.
write_kubeconfig() {
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: weir-testenv
  cluster: {server: "https://127.0.0.1:${4:-$api_port}", certificate-authority: "$pki/ca.crt"}
users:
- name: $2
  user: {token: "$3"}
contexts:
- name: $2
  context: {cluster: weir-testenv, user: $2}
current-context: $2
KC
  chmod 600 "$1"
}
kubeconfig=$dir/kubeconfig
write_kubeconfig "$kubeconfig" admin "$token"

# --- etcd
start etcd "$ETCD_DIR/etcd" --name weir --data-dir "$dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
  --initial-cluster "weir=http://127.0.0.1:$etcd_peer" --unsafe-no-fsync --log-level warn
wait_for etcd 30 curl -fsS "http://127.0.0.1:$etcd_port/health"

# --- kube-apiserver
# apiserver NAME PORT ETCD_PREFIX: starts one on the shared etcd, under its own prefix.
apiserver() {
  start "$1" "$K8S_DIR/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" --etcd-prefix "$3" --bind-address 127.0.0.1 --advertise-address 127.0.0.1 \
    --secure-port "$2" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --cert-dir "$pki" --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local --api-audiences https://kubernetes.default.svc.cluster.local \
    --token-auth-file "$pki/tokens.csv" --authorization-mode RBAC --service-cluster-ip-range 10.0.0.0/24 \
    --endpoint-reconciler-type none --allow-privileged=true -v 1
}
apiserver kube-apiserver "$api_port" /registry
# A second apiserver, with no controllers or node, whose CRDs have no CEL rules: an apiserver
# that does not enforce them (objects created before the rules, older clusters). The tests show
# that the controller refuses there what the rules refuse here.
apiserver kube-apiserver-norules "$norules_port" /registry-norules
wait_for kube-apiserver 90 curl -fsS --cacert "$pki/ca.crt" -H "Authorization: Bearer $token" "https://127.0.0.1:$api_port/readyz"

# --- controller-manager and scheduler
start kube-controller-manager "$K8S_DIR/kube-controller-manager" --kubeconfig "$kubeconfig" \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" --leader-elect=false \
  --use-service-account-credentials=false --secure-port 0 --cluster-name weir-testenv \
  --controllers '*,-node-ipam-controller,-node-lifecycle-controller,-ttl-controller,-persistentvolume-attach-detach-controller,-persistentvolume-binder-controller,-persistentvolumeclaim-protection-controller,-persistentvolume-protection-controller' \
  -v 1
start kube-scheduler "$K8S_DIR/kube-scheduler" --kubeconfig "$kubeconfig" --leader-elect=false \
  --secure-port 0 -v 1

# --- Garage (S3)
s3_key="GK$(openssl rand -hex 12)"; s3_secret=$(openssl rand -hex 32); bucket=weir-test
cat > "$dir/garage/garage.toml" <<GT
metadata_dir = "$dir/garage/meta"
data_dir = "$dir/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$s3_rpc"
rpc_public_addr = "127.0.0.1:$s3_rpc"
rpc_secret = "$(openssl rand -hex 32)"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3_port"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$s3_admin"
admin_token = "$(openssl rand -hex 16)"
metrics_token = "$(openssl rand -hex 16)"
GT
GARAGE_DEFAULT_ACCESS_KEY=$s3_key GARAGE_DEFAULT_SECRET_KEY=$s3_secret GARAGE_DEFAULT_BUCKET=$bucket \
  start garage "$GARAGE_DIR/bin/garage" -c "$dir/garage/garage.toml" server --single-node --default-bucket
wait_for garage 30 curl -fsS "http://127.0.0.1:$s3_admin/health"

# --- Kafka: three brokers (KRaft, each broker and controller), writes $dir/kafka.env
bash "$(dirname "$0")/kafka-up.sh" "$dir"

# --- the node agent
KUBECONFIG=$kubeconfig start weir-node "$bin_dir/weir-node" run --node-name "$node_name" --state-dir "$node_dir" \
  --image-path "$bin_dir" --pod-network "$pod_network" --apiserver "127.0.0.1:$api_port"
export KUBECONFIG=$kubeconfig
wait_for "a Ready node" 60 sh -c "kubectl get node $node_name -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' 2>/dev/null | grep -qx True"
wait_for "the default service account" 60 kubectl -n default get serviceaccount default

# --- the controller's identity: the chart's ServiceAccount and RBAC (rendered by the Helm SDK
# with two replicas, so with the leader-election Role in weir-system), and a kubeconfig with
# its token. The end-to-end tests run their controllers with it, so they pass only if the
# chart grants enough.
"$venv/bin/python" "$root/charts/render.py" --set-json '{"replicas": 2}' \
  --only Namespace,ServiceAccount,ClusterRole,ClusterRoleBinding,Role,RoleBinding | kubectl apply -f - >/dev/null
# Since 1.24 a ServiceAccount gets no token Secret of its own: ask for one (the token
# controller fills it in), as a long-lived token for the tests' controllers.
kubectl apply -f - >/dev/null <<SECRET
apiVersion: v1
kind: Secret
metadata:
  name: weir-controller-testenv-token
  namespace: weir-system
  annotations: {kubernetes.io/service-account.name: weir-controller}
type: kubernetes.io/service-account-token
SECRET
sa_token() { kubectl -n weir-system get secret weir-controller-testenv-token -o jsonpath='{.data.token}'; }
wait_for "the controller's ServiceAccount token" 60 sh -c "$(declare -f sa_token); sa_token | grep -q ."
write_kubeconfig "$dir/controller.kubeconfig" weir-controller "$(sa_token | base64 -d)"

# --- the apiserver without CEL rules: the CRDs with every x-kubernetes-validations removed.
wait_for kube-apiserver-norules 90 curl -fsS --cacert "$pki/ca.crt" -H "Authorization: Bearer $token" "https://127.0.0.1:$norules_port/readyz"
write_kubeconfig "$dir/norules.kubeconfig" admin "$token" "$norules_port"
"$venv/bin/python" - "$root/crds/weir-crds.yaml" >"$dir/crds-norules.yaml" <<'PY'
import sys, yaml
def strip(node):
    if isinstance(node, dict):
        node.pop("x-kubernetes-validations", None)
        for v in node.values(): strip(v)
    elif isinstance(node, list):
        for v in node: strip(v)
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
strip(docs)
yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
PY
KUBECONFIG=$dir/norules.kubeconfig kubectl apply --server-side -f "$dir/crds-norules.yaml" >/dev/null
KUBECONFIG=$dir/norules.kubeconfig kubectl wait --for=condition=Established --timeout=60s \
  crd/streamjobs.weir.dev crd/streamsnapshots.weir.dev >/dev/null

cat > "$dir/env.sh" <<ENV
# Written by tests/env/up.sh: source it to use the test environment.
export WEIR_TESTENV_DIR="$dir"
export KUBECONFIG="$kubeconfig"
# The chart's ServiceAccount (controllers under test run with it).
export WEIR_CONTROLLER_KUBECONFIG="$dir/controller.kubeconfig"
# An apiserver whose CRDs have no CEL rules (no controllers, no node): admin's kubeconfig.
export WEIR_NORULES_KUBECONFIG="$dir/norules.kubeconfig"
# kubectl $K8S_PATCH, built with the apiserver.
export PATH="$K8S_DIR:\$PATH"
export WEIR_APISERVER="https://127.0.0.1:$api_port"
export AWS_ENDPOINT_URL="http://127.0.0.1:$s3_port"
export AWS_REGION=garage
export AWS_ACCESS_KEY_ID="$s3_key"
export AWS_SECRET_ACCESS_KEY="$s3_secret"
export WEIR_TEST_BUCKET="$bucket"
export WEIR_PYTHON="$venv/bin/python"
export WEIR_NODE_NAME=$node_name
export WEIR_POD_NETWORK="$pod_network"
ENV
cat "$dir/kafka.env" >> "$dir/env.sh"
up_ok=1
log "test environment up: source $dir/env.sh"
