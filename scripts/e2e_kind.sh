#!/usr/bin/env bash
# End-to-end test on a kind cluster: the operator's Helm chart, the Kubeflow training operator,
# MinIO as the S3 store, and a tiny CPU run (manifests/samples/backtranslationrun.tiny.yaml) that
# must reach phase Succeeded. .github/workflows/e2e-kind.yaml runs it step by step; on a machine
# with Docker, kind, kubectl and helm it runs as a whole:
#
#   bash scripts/e2e_kind.sh all          # creates the kind cluster if missing; about 30-60 min
#   bash scripts/e2e_kind.sh STEP         # one step: cluster images addons install data run dump delete
#
# This repository's own CI machine has no Docker engine and no kind: the script has never run
# there. It is for GitHub's runners (the workflow) and for your machine or CI.
#
# What the run needs is read from the sample itself (metadata.name and namespace, the S3
# endpoint, bucket and keys): MinIO is deployed where spec.storage.s3.endpoint points
# (http://SERVICE.NAMESPACE.svc...:PORT), the sample data from examples/data and a tiny model
# (`humpback tiny-model`) are uploaded to the s3:// URIs of spec.seed.source, spec.corpus.source
# and spec.baseModel, and the Secret spec.storage.s3.credentialsSecret gets MinIO's credentials.
#
# Settings (environment): KIND_CLUSTER, KIND_NODE_IMAGE, TRAINING_OPERATOR_REF, MINIO_IMAGE,
# OPERATOR_IMAGE, RUNTIME_IMAGE, SAMPLE, RUN_TIMEOUT; defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."

KIND_CLUSTER=${KIND_CLUSTER:-humpback-e2e}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.32.2}
# Kubeflow training operator v1 (PyTorchJob, kubeflow.org/v1); the repository is now kubeflow/trainer.
TRAINING_OPERATOR_REF=${TRAINING_OPERATOR_REF:-v1.9.3}
MINIO_IMAGE=${MINIO_IMAGE:-quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z}
# The CPU runtime: slim Python (the operator image's base) and the CPU torch wheel.
CPU_BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# Tags that are not `latest`, so that pods use the images `kind load` put on the node.
OPERATOR_IMAGE=${OPERATOR_IMAGE:-ghcr.io/humpback-dev/humpback-operator:e2e}
RUNTIME_IMAGE=${RUNTIME_IMAGE:-ghcr.io/humpback-dev/humpback-runtime:e2e-cpu}
SAMPLE=${SAMPLE:-manifests/samples/backtranslationrun.tiny.yaml}
RUN_TIMEOUT=${RUN_TIMEOUT:-60m}
RELEASE_NAMESPACE=humpback-system
# Test-only credentials of the throwaway MinIO.
MINIO_USER=humpback-e2e
MINIO_PASSWORD=humpback-e2e-secret
MODEL_DIR=.cache/e2e-tiny-llama
LOCAL_S3_PORT=19000

log() { echo "e2e: $*" >&2; }

# Python in the runtime image (PyYAML, boto3, the project), with the repository mounted at /work.
in_runtime() {
    docker run --rm -i --network host --user "$(id -u):$(id -g)" -e HOME=/tmp \
        -e PYTHONPATH=/work -v "$PWD:/work" -w /work "$@"
}

# Facts of the sample run, as shell assignments: RUN_NAME RUN_NAMESPACE S3_SECRET S3_ENDPOINT
# MINIO_SERVICE MINIO_NAMESPACE MINIO_PORT.
sample_facts() {
    in_runtime --entrypoint python "$RUNTIME_IMAGE" - "$SAMPLE" <<'PY'
import shlex, sys
from urllib.parse import urlparse

import yaml

path = sys.argv[1]
doc = yaml.safe_load(open(path))
meta, spec = doc["metadata"], doc["spec"]
s3 = spec.get("storage", {}).get("s3") or {}
endpoint = s3.get("endpoint")
if not endpoint:
    sys.exit(f"{path}: spec.storage.s3.endpoint is not set; the e2e test serves S3 from MinIO in the cluster")
url = urlparse(endpoint)
host = (url.hostname or "").split(".")
if len(host) < 3 or host[2] != "svc":
    sys.exit(f"{path}: spec.storage.s3.endpoint {endpoint} is not a Service URL (http://SERVICE.NAMESPACE.svc:PORT)")
facts = {
    "RUN_NAME": meta["name"],
    "RUN_NAMESPACE": meta.get("namespace", "default"),
    "S3_SECRET": s3.get("credentialsSecret") or "humpback-s3",
    "S3_ENDPOINT": endpoint,
    "MINIO_SERVICE": host[0],
    "MINIO_NAMESPACE": host[1],
    "MINIO_PORT": str(url.port or 80),
}
for key, value in facts.items():
    print(f"{key}={shlex.quote(value)}")
PY
}

load_facts() {
    local facts
    facts=$(sample_facts)
    eval "$facts"
}

step_cluster() {
    if kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
        log "kind cluster $KIND_CLUSTER exists"
    else
        kind create cluster --name "$KIND_CLUSTER" --image "$KIND_NODE_IMAGE" --wait 120s
    fi
    kubectl cluster-info --context "kind-$KIND_CLUSTER"
}

step_images() {
    log "building $OPERATOR_IMAGE"
    docker build -f images/operator/Dockerfile -t "$OPERATOR_IMAGE" .
    log "building $RUNTIME_IMAGE (CPU torch)"
    docker build -f images/runtime/Dockerfile \
        --build-arg BASE_IMAGE="$CPU_BASE_IMAGE" \
        --build-arg TORCH_INDEX="$TORCH_CPU_INDEX" \
        --build-arg DS_ACCELERATOR=cpu \
        -t "$RUNTIME_IMAGE" .
    kind load docker-image --name "$KIND_CLUSTER" "$OPERATOR_IMAGE" "$RUNTIME_IMAGE"
}

step_addons() {
    load_facts
    log "installing the Kubeflow training operator $TRAINING_OPERATOR_REF"
    kubectl apply --server-side -k "github.com/kubeflow/trainer.git/manifests/overlays/standalone?ref=$TRAINING_OPERATOR_REF"
    kubectl -n kubeflow rollout status deployment/training-operator --timeout=300s

    log "deploying MinIO as $MINIO_SERVICE.$MINIO_NAMESPACE:$MINIO_PORT"
    kubectl create namespace "$MINIO_NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
    kubectl apply -n "$MINIO_NAMESPACE" -f - <<EOF
apiVersion: v1
kind: Secret
metadata:
  name: minio-root
stringData:
  MINIO_ROOT_USER: $MINIO_USER
  MINIO_ROOT_PASSWORD: $MINIO_PASSWORD
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: $MINIO_SERVICE
  labels: {app: $MINIO_SERVICE}
spec:
  replicas: 1
  selector:
    matchLabels: {app: $MINIO_SERVICE}
  template:
    metadata:
      labels: {app: $MINIO_SERVICE}
    spec:
      containers:
        - name: minio
          image: $MINIO_IMAGE
          args: [server, /data, --address, ":9000"]
          envFrom:
            - secretRef: {name: minio-root}
          ports:
            - {name: s3, containerPort: 9000}
          readinessProbe:
            httpGet: {path: /minio/health/ready, port: 9000}
          volumeMounts:
            - {name: data, mountPath: /data}
      volumes:
        - name: data
          emptyDir: {}
---
apiVersion: v1
kind: Service
metadata:
  name: $MINIO_SERVICE
spec:
  selector: {app: $MINIO_SERVICE}
  ports:
    - {name: s3, port: $MINIO_PORT, targetPort: s3}
EOF
    kubectl -n "$MINIO_NAMESPACE" rollout status "deployment/$MINIO_SERVICE" --timeout=300s
}

step_install() {
    load_facts
    log "installing the humpback-operator chart"
    kubectl create namespace "$RELEASE_NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
    # The operator's own S3 access (it reads _SUCCESS.json to skip finished stages).
    kubectl -n "$RELEASE_NAMESPACE" create secret generic humpback-operator-s3 \
        --from-literal=AWS_ACCESS_KEY_ID="$MINIO_USER" \
        --from-literal=AWS_SECRET_ACCESS_KEY="$MINIO_PASSWORD" \
        --from-literal=AWS_ENDPOINT_URL="$S3_ENDPOINT" \
        --from-literal=AWS_REGION=us-east-1 \
        --dry-run=client -o yaml | kubectl apply -f -
    helm upgrade --install humpback-operator charts/humpback-operator \
        --namespace "$RELEASE_NAMESPACE" --create-namespace \
        --set image.repository="${OPERATOR_IMAGE%:*}" \
        --set image.tag="${OPERATOR_IMAGE##*:}" \
        --set image.pullPolicy=IfNotPresent \
        --set runtime.image="$RUNTIME_IMAGE" \
        --set operator.s3.existingSecret=humpback-operator-s3 \
        --wait --timeout 5m
    kubectl get crd backtranslationruns.humpback.dev
}

step_data() {
    load_facts
    log "creating Secret $RUN_NAMESPACE/$S3_SECRET"
    kubectl create namespace "$RUN_NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
    kubectl -n "$RUN_NAMESPACE" create secret generic "$S3_SECRET" \
        --from-literal=AWS_ACCESS_KEY_ID="$MINIO_USER" \
        --from-literal=AWS_SECRET_ACCESS_KEY="$MINIO_PASSWORD" \
        --dry-run=client -o yaml | kubectl apply -f -

    log "building the tiny model into $MODEL_DIR"
    mkdir -p .cache
    in_runtime --entrypoint python "$RUNTIME_IMAGE" -m humpback_runtime tiny-model "$MODEL_DIR"

    log "uploading the sample data and the tiny model to MinIO"
    kubectl -n "$MINIO_NAMESPACE" port-forward "service/$MINIO_SERVICE" "$LOCAL_S3_PORT:$MINIO_PORT" > /dev/null &
    local forward=$! rc=0
    for _ in $(seq 30); do
        curl -fsS "http://127.0.0.1:$LOCAL_S3_PORT/minio/health/ready" > /dev/null 2>&1 && break
        sleep 1
    done
    in_runtime -e AWS_ACCESS_KEY_ID="$MINIO_USER" -e AWS_SECRET_ACCESS_KEY="$MINIO_PASSWORD" \
        -e AWS_ENDPOINT_URL="http://127.0.0.1:$LOCAL_S3_PORT" -e AWS_EC2_METADATA_DISABLED=true \
        --entrypoint python "$RUNTIME_IMAGE" - "$SAMPLE" "$MODEL_DIR" <<'PY' || rc=$?
import os, sys
from pathlib import Path

import boto3
import yaml

sample, model_dir = sys.argv[1], Path(sys.argv[2])
spec = yaml.safe_load(open(sample))["spec"]
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")


def split(uri):
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


files = {
    "spec.seed.source": spec["seed"]["source"],
    "spec.corpus.source": spec["corpus"]["source"],
}
for i, eval_set in enumerate((spec.get("evaluation") or {}).get("sets") or []):
    files[f"spec.evaluation.sets[{i}].source"] = eval_set["source"]
uris = [spec["storage"]["uri"], spec["baseModel"], *files.values()]
for bucket in sorted({split(u)[0] for u in uris if u.startswith("s3://")}):
    try:
        s3.create_bucket(Bucket=bucket)
        print(f"created bucket {bucket}")
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
for field, uri in files.items():
    if not uri.startswith("s3://"):
        continue
    bucket, key = split(uri)
    local = Path("examples/data") / Path(key).name
    if key.endswith("/") or not local.is_file():
        sys.exit(f"{sample}: {field} {uri}: expected an s3:// URI of a file named like one in examples/data")
    s3.upload_file(str(local), bucket, key)
    print(f"uploaded {local} to {uri}")
if spec["baseModel"].startswith("s3://"):
    bucket, prefix = split(spec["baseModel"].rstrip("/"))
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir).as_posix()
        if rel.startswith("."):
            continue  # the builder's own marker files
        s3.upload_file(str(path), bucket, f"{prefix}/{rel}")
    print(f"uploaded {model_dir} to {spec['baseModel']}")
PY
    kill "$forward" 2>/dev/null || true
    return "$rc"
}

step_run() {
    load_facts
    log "applying $SAMPLE and waiting up to $RUN_TIMEOUT for run $RUN_NAMESPACE/$RUN_NAME to succeed"
    kubectl apply -f "$SAMPLE" || return 1
    # Poll so that a Failed run ends the test at once instead of at the timeout. Every command
    # checks its own status: `set -e` does not apply inside `step_run || ...` (the `all` step).
    local deadline=$(( $(date +%s) + $(timeout_seconds "$RUN_TIMEOUT") )) phase=""
    while [ "$(date +%s)" -lt "$deadline" ]; do
        phase=$(kubectl -n "$RUN_NAMESPACE" get btr "$RUN_NAME" -o jsonpath='{.status.phase}' || true)
        kubectl -n "$RUN_NAMESPACE" get btr "$RUN_NAME" --no-headers || true
        case "$phase" in
            Succeeded) break ;;
            Failed) log "run $RUN_NAME failed"; return 1 ;;
        esac
        sleep 20
    done
    kubectl -n "$RUN_NAMESPACE" wait "btr/$RUN_NAME" --for=jsonpath='{.status.phase}'=Succeeded --timeout=10s || return 1
    kubectl -n "$RUN_NAMESPACE" describe btr "$RUN_NAME"
}

timeout_seconds() {  # 60m, 1h, 90s -> seconds
    local v=$1
    case "$v" in
        *h) echo $(( ${v%h} * 3600 )) ;;
        *m) echo $(( ${v%m} * 60 )) ;;
        *s) echo "${v%s}" ;;
        *) echo "$v" ;;
    esac
}

step_dump() {
    load_facts || true
    local ns=${RUN_NAMESPACE:-default} name=${RUN_NAME:-}
    set +e
    kubectl get btr -A -o wide
    [ -n "$name" ] && kubectl -n "$ns" describe btr "$name"
    [ -n "$name" ] && kubectl -n "$ns" get btr "$name" -o yaml
    kubectl get pytorchjobs,jobs,deployments,services,pods -A -o wide
    kubectl get events -A --sort-by=.lastTimestamp
    kubectl -n "$RELEASE_NAMESPACE" logs deployment/humpback-operator --tail=-1
    if [ -n "$name" ]; then
        for pod in $(kubectl -n "$ns" get pods -l "humpback.dev/run=$name" -o name); do
            echo "----- logs of $pod"
            kubectl -n "$ns" logs "$pod" --all-containers --prefix --tail=500
        done
    fi
    kubectl -n kubeflow logs deployment/training-operator --tail=200
    set -e
}

step_delete() {
    kind delete cluster --name "$KIND_CLUSTER"
}

main() {
    local step=${1:-all}
    case "$step" in
        all)
            step_cluster
            step_images
            step_addons
            step_install
            step_data
            step_run || { step_dump; exit 1; }
            ;;
        cluster|images|addons|install|data|run|dump|delete) "step_$step" ;;
        *) echo "usage: $0 [all|cluster|images|addons|install|data|run|dump|delete]" >&2; exit 2 ;;
    esac
}

main "$@"
