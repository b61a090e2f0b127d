#!/usr/bin/env bash
# Make sure PostgreSQL and RabbitMQ answer on localhost, starting the local services if they
# are installed but stopped. Where neither is installed, the tests fall back to testcontainers.
set -uo pipefail

wait_for() {  # name, probe command...
  local name=$1; shift
  for _ in $(seq 1 60); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "services: $name did not come up" >&2
  return 1
}

pg_up() { pg_isready -h 127.0.0.1 -p 5432 -q; }
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if command -v pg_isready >/dev/null && ! pg_up; then
  if command -v pg_ctlcluster >/dev/null; then
    echo "services: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  wait_for postgresql pg_up || exit 1
fi

if ! amqp_up && command -v rabbitmq-server >/dev/null; then
  echo "services: starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_for rabbitmq amqp_up || exit 1
  # The port opens before the broker is ready to accept AMQP sessions.
  command -v rabbitmq-diagnostics >/dev/null && \
    wait_for rabbitmq rabbitmq-diagnostics -q check_running
fi
exit 0
