#!/usr/bin/env bash
# Installs the real DICOM peers the tests use (Debian's orthanc and dcmtk; iproute2's ss) and makes sure the services the
# tests talk to (PostgreSQL, Redis, RabbitMQ on loopback) are up, starting a stopped one the way this
# machine kind starts it. Idempotent; needs root (or sudo) only when something is missing.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
command -v Orthanc >/dev/null 2>&1 || missing+=(orthanc)
command -v findscu >/dev/null 2>&1 || missing+=(dcmtk)
command -v ss >/dev/null 2>&1 || missing+=(iproute2)  # the loopback test reads every connection with ss
command -v curl >/dev/null 2>&1 || missing+=(curl)  # the compose topology test calls the API inside its netns
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
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
