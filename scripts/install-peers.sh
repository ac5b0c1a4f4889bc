#!/usr/bin/env bash
# Installs the real DICOM peers the tests use (Debian's orthanc with its DICOMweb plugin orthanc-dicomweb, and
# dcmtk; iproute2's ss) and makes sure the services the tests talk to (PostgreSQL, Redis, RabbitMQ on
# loopback) are up, starting a stopped one the way this machine kind starts it. Idempotent; needs root (or
# sudo) only when something is missing.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
dpkg -s orthanc-dicomweb >/dev/null 2>&1 || missing+=(orthanc-dicomweb)  # the DICOMweb reference server
command -v findscu >/dev/null 2>&1 || missing+=(dcmtk)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)  # the loopback test reads every connection with ss
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # tests/test_ohif.py drives it headless
command -v npm >/dev/null 2>&1 || missing+=(npm)  # fetches OHIF's built viewer below
command -v curl >/dev/null 2>&1 || missing+=(curl)  # the compose topology test calls the API inside its netns
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# OHIF's built viewer, as the npm registry ships it in @ohif/app (dist/ only: `npm pack` fetches the one
# tarball, none of the package's build-time dependencies). tests/peers/ohif.py reads the same version.
OHIF_VERSION=3.13.2
ohif_dir="$(cd "$(dirname "$0")/.." && pwd)/var/ohif/$OHIF_VERSION"
if [ ! -f "$ohif_dir/dist/index.html" ]; then
  echo "installing @ohif/app@$OHIF_VERSION into $ohif_dir"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  mkdir -p "$tmp/unpacked" "$(dirname "$ohif_dir")"
  tar -xzf "$tmp/ohif-app-$OHIF_VERSION.tgz" -C "$tmp/unpacked" --strip-components=1 package/dist package/package.json
  # Moved in whole: an interrupted install leaves no half viewer that the check above would take as done.
  rm -rf "$ohif_dir" && mv "$tmp/unpacked" "$ohif_dir"
  rm -rf "$tmp"
fi

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! up 5432 && command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "starting PostgreSQL"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! up 6379 && command -v redis-server >/dev/null 2>&1; then
  echo "starting Redis"
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi
if ! up 5672 && command -v rabbitmq-server >/dev/null 2>&1; then
  echo "starting RabbitMQ"
  $SUDO rabbitmq-server -detached || true
fi
for port in 5432 6379 5672; do
  for _ in $(seq 1 50); do up "$port" && break; sleep 0.2; done
  up "$port" || echo "warning: nothing listens on 127.0.0.1:$port (tests needing it skip locally, fail under CI)"
done
