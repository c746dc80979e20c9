#!/usr/bin/env bash
# Checks the manifests of deploy/k8s against the Kubernetes API schemas, strictly (an unknown or
# misspelt field fails), for the oldest and the newest Kubernetes versions in KUBERNETES_VERSIONS.
# The checker, the kubernetes-validate Python package, goes into a virtual environment under
# target/ on first use (PyPI once; offline after that).
set -euo pipefail
cd "$(dirname "$0")/../.."

TOOL_VERSION=1.37.0
KUBERNETES_VERSIONS=${KUBERNETES_VERSIONS:-"1.30.0 1.37.0"}
VENV=target/k8s-validate
TOOL=$VENV/bin/kubernetes-validate

log() { printf 'k8s: %s\n' "$*"; }

if [ "$("$TOOL" --version 2>/dev/null)" != "$TOOL_VERSION" ]; then
  log "installing kubernetes-validate $TOOL_VERSION into $VENV"
  if ! python3 -m venv --clear "$VENV" >/dev/null 2>&1; then
    # Debian and Ubuntu ship the venv module as a package of its own.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      log "python3 has no venv module: installing python3-venv with apt-get"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv --clear "$VENV"
    else
      log "python3 -m venv failed: install Python 3 with its venv module (Debian: python3-venv)"
      exit 1
    fi
  fi
  if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$TOOL_VERSION"; then
    # Without PyPI the schemas cannot be had; say so loudly rather than fail every test run.
    # K8S_VALIDATE_REQUIRED=1 makes this an error.
    log "SKIPPED: could not install kubernetes-validate $TOOL_VERSION (is PyPI reachable?)"
    rm -rf "$VENV"
    [ "${K8S_VALIDATE_REQUIRED:-0}" = 1 ] && exit 1
    exit 0
  fi
fi

# Every manifest but kustomize's own file and the KEDA ScaledObject, a custom resource with no
# schema here (worker/tests/deploy.rs checks it against what the workers consume).
manifests=()
for file in deploy/k8s/*.yaml; do
  case $(basename "$file") in
    kustomization.yaml | keda-scaledobject.yaml) ;;
    *) manifests+=("$file") ;;
  esac
done
for version in $KUBERNETES_VERSIONS; do
  "$TOOL" --strict --quiet --kubernetes-version "$version" "${manifests[@]}"
  log "${#manifests[@]} manifests valid against Kubernetes $version (skipped: kustomization.yaml, keda-scaledobject.yaml)"
done
