#!/usr/bin/env bash
# `make demo`: liveclone on a local kind cluster. A claim with a few hundred
# MiB of data, a live clone of it read by a pod at once, and the clone's
# hydration followed to the end. Safe to run again: every step reuses what
# is already there. Needs Docker, kind, kubectl, helm and a host kernel
# with dm-clone (docs/E2E.md).
set -euo pipefail

CLUSTER=${LIVECLONE_DEMO_CLUSTER:-liveclone-demo}
CONTEXT=kind-$CLUSTER
NAMESPACE=liveclone-demo
IMAGE=liveclone:e2e
SNAPSHOTTER_TAG=v8.7.0
WORKLOAD_IMAGE=busybox:1.37.0
DATA_MIB=400
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\033[31mdemo: %s\033[0m\n' "$*" >&2; exit 1; }
kc() { kubectl --context "$CONTEXT" "$@"; }

# --- what the machine needs ---------------------------------------------
missing=()
for tool in docker kind kubectl helm; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] || die "missing on the PATH: ${missing[*]} (see docs/E2E.md, Prerequisites)"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer: start it, and check this user may use it (docker group)"
if [ ! -d /sys/module/dm_clone ] && ! modinfo dm-clone >/dev/null 2>&1; then
    die "the host kernel $(uname -r) has no dm-clone; kind nodes share the host's kernel. See docs/DM-CLONE.md"
fi

# --- cluster, image, snapshot support, chart -----------------------------
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    say "Reusing kind cluster $CLUSTER"
else
    say "Creating kind cluster $CLUSTER (one control plane, one worker)"
    kind create cluster --name "$CLUSTER" --config "$ROOT/deploy/kind/cluster.yaml" --wait 300s
fi

say "Building the driver image $IMAGE (Dockerfile, target runtime)"
docker build --target runtime --tag "$IMAGE" "$ROOT"
kind load docker-image "$IMAGE" --name "$CLUSTER"

say "Installing VolumeSnapshot support (external-snapshotter $SNAPSHOTTER_TAG)"
base=https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/$SNAPSHOTTER_TAG
for path in \
    client/config/crd/snapshot.storage.k8s.io_volumesnapshotclasses.yaml \
    client/config/crd/snapshot.storage.k8s.io_volumesnapshotcontents.yaml \
    client/config/crd/snapshot.storage.k8s.io_volumesnapshots.yaml \
    deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml \
    deploy/kubernetes/snapshot-controller/setup-snapshot-controller.yaml; do
    kc apply --server-side --force-conflicts -f "$base/$path" >/dev/null
done
kc -n kube-system set image deployment/snapshot-controller \
    "snapshot-controller=registry.k8s.io/sig-storage/snapshot-controller:$SNAPSHOTTER_TAG" >/dev/null
kc -n kube-system rollout status deployment/snapshot-controller --timeout=300s

say "Installing the liveclone chart"
helm upgrade --install liveclone "$ROOT/charts/liveclone" \
    --namespace liveclone --create-namespace --kube-context "$CONTEXT" \
    --set image.repository=liveclone --set image.tag=e2e --set image.pullPolicy=Never \
    --wait --timeout 10m
kc -n liveclone get pods -o wide

# --- a claim with data ---------------------------------------------------
kc create namespace "$NAMESPACE" --dry-run=client -o yaml | kc apply -f - >/dev/null

say "A 1 GiB claim 'data' and a pod writing ${DATA_MIB} MiB of random data to it"
kc -n "$NAMESPACE" apply -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: liveclone
  resources: {requests: {storage: 1Gi}}
YAML
if ! kc -n "$NAMESPACE" get pod writer >/dev/null 2>&1 && ! kc -n "$NAMESPACE" get pvc copy >/dev/null 2>&1; then
    kc -n "$NAMESPACE" apply -f - <<YAML
apiVersion: v1
kind: Pod
metadata: {name: writer}
spec:
  restartPolicy: Never
  containers:
    - name: writer
      image: $WORKLOAD_IMAGE
      command: [sh, -c, 'dd if=/dev/urandom of=/data/blob bs=1048576 count=$DATA_MIB conv=fsync && sha256sum /data/blob | tee /data/blob.sha256']
      volumeMounts: [{name: data, mountPath: /data}]
  volumes: [{name: data, persistentVolumeClaim: {claimName: data}}]
YAML
fi
if kc -n "$NAMESPACE" get pod writer >/dev/null 2>&1; then
    kc -n "$NAMESPACE" wait pod/writer --for=jsonpath='{.status.phase}'=Succeeded --timeout=600s
    echo "written: $(kc -n "$NAMESPACE" logs writer)"
    # The clone needs the claim free of writers.
    kc -n "$NAMESPACE" delete pod writer --wait=true >/dev/null
fi

# --- the live clone --------------------------------------------------------
say "A clone 'copy' of 'data', and a pod reading it at once"
kc -n "$NAMESPACE" apply -f - <<YAML
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: copy}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: liveclone
  dataSource: {kind: PersistentVolumeClaim, name: data}
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: Pod
metadata: {name: reader}
spec:
  containers:
    - name: reader
      image: $WORKLOAD_IMAGE
      # Checks every byte against the sum written with the data, then stays.
      command: [sh, -c, 'cd /data && sha256sum -c blob.sha256 && exec sleep 86400']
      volumeMounts: [{name: copy, mountPath: /data}]
  volumes: [{name: copy, persistentVolumeClaim: {claimName: copy}}]
YAML
kc -n "$NAMESPACE" wait pod/reader --for=condition=Ready --timeout=600s
echo "reader: $(kc -n "$NAMESPACE" logs reader)   (read while the copy runs)"

say "The hydration (kubectl get vh -w), until Complete"
kc -n "$NAMESPACE" get vh copy -w &
watcher=$!
trap 'kill "$watcher" 2>/dev/null || true' EXIT
kc -n "$NAMESPACE" wait vh/copy --for=jsonpath='{.status.phase}'=Complete --timeout=1800s >/dev/null
sleep 1
kill "$watcher" 2>/dev/null || true

say "Done: 'copy' is an independent full copy of 'data'"
cat <<TEXT
Look around:  kubectl --context $CONTEXT -n $NAMESPACE get pvc,vh
              kubectl --context $CONTEXT get liveclonevolumes
Clean up:     kubectl --context $CONTEXT delete namespace $NAMESPACE   # the demo's claims and pods
              kind delete cluster --name $CLUSTER                        # everything
              sudo rm -rf /var/tmp/liveclone-kind                        # the worker's pool files
TEXT
