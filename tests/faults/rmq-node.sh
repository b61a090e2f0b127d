#!/bin/bash
# One standalone RabbitMQ node beside the system node, for fault-injection tests: its own node
# name, AMQP port, distribution port and data directory; the system Erlang cookie, so the CLI
# tools can talk to it. The system node itself is never stopped, changed or reconfigured.
#
#   rmq-node.sh start DIR [NAME PORT DIST_PORT]   start (or restart, data kept) and wait until up;
#                                                 NAME/ports are needed the first time only
#   rmq-node.sh stop DIR                          graceful stop; returns once the process is gone
#   rmq-node.sh kill DIR                          kill -9 the node (data kept: durable queues survive)
#   rmq-node.sh ctl DIR ARGS...                   rabbitmqctl against the node
#   rmq-node.sh running DIR                       exit 0 if the node's process is alive
#   rmq-node.sh destroy DIR                       kill it if alive, then delete DIR
#   rmq-node.sh check                             exit 0 if RabbitMQ's tools are where we look
#
# Needs root or the rabbitmq user: the node runs as `rabbitmq` with the system cookie's HOME.
# DIR's parent must be traversable by that user.
set -euo pipefail

RMQ_BIN=${RMQ_BIN:-/usr/lib/rabbitmq/bin}  # not the /usr/sbin wrappers: they write the system log
COOKIE_HOME=${RMQ_COOKIE_HOME:-/var/lib/rabbitmq}

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
if [ "${1:-}" = check ]; then
  [ -x "$RMQ_BIN/rabbitmq-server" ] && [ -x "$RMQ_BIN/rabbitmqctl" ] && [ -d "$COOKIE_HOME" ]
  exit
fi
[ $# -ge 2 ] || usage
CMD=$1 DIR=$2
shift 2

as_rmq() {
  if [ "$(id -u)" = 0 ]; then runuser -u rabbitmq -- env HOME="$COOKIE_HOME" "$@"
  else env HOME="$COOKIE_HOME" "$@"; fi
}

load() {  # NAME, PORT, DIST_PORT as saved by the first start
  [ -f "$DIR/node.env" ] || { echo "no node in $DIR (start it with NAME PORT DIST_PORT)" >&2; exit 1; }
  # shellcheck source=/dev/null
  . "$DIR/node.env"
  PIDFILE=$DIR/mnesia/$NAME@localhost.pid
}

node_env() {
  echo RABBITMQ_NODENAME="$NAME@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$PORT" RABBITMQ_DIST_PORT="$DIST_PORT" \
    RABBITMQ_MNESIA_BASE="$DIR/mnesia" RABBITMQ_LOG_BASE="$DIR/log" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins" \
    RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$DIR/advanced.config" \
    RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" ERL_EPMD_ADDRESS=127.0.0.1
}

ctl() {
  as_rmq RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf" ERL_EPMD_ADDRESS=127.0.0.1 \
    "$RMQ_BIN/rabbitmqctl" -n "$NAME@localhost" "$@"
}

node_pid() {  # the beam process, or nothing
  [ -f "$PIDFILE" ] || return 0
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null || true)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
  return 0
}

init() {  # first start: the files the node reads instead of the system ones
  local name=$1 port=$2 dist=$3
  mkdir -p "$DIR/mnesia" "$DIR/log"
  printf 'NAME=%s\nPORT=%s\nDIST_PORT=%s\n' "$name" "$port" "$dist" > "$DIR/node.env"
  echo '[].' > "$DIR/enabled_plugins"                 # no management listener, no extra ports
  : > "$DIR/rabbitmq-env.conf"                         # not the system env file (its NODENAME)
  # The system rabbitmq.conf pins the system node's listener; ours names our own port.
  printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users.guest = true\n' "$port" \
    > "$DIR/rabbitmq.conf"
  # The dead-letter worker of a quorum queue retries a refused at-least-once dead-lettering
  # on this timer (3 min by default): short here, so a test can watch a retry happen.
  echo '[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 2000}]}].' \
    > "$DIR/advanced.config"
  if [ "$(id -u)" = 0 ]; then chown -R rabbitmq:rabbitmq "$DIR"; fi
}

start() {
  if [ ! -f "$DIR/node.env" ]; then
    [ $# -eq 3 ] || usage
    init "$@"
  fi
  load
  if [ -n "$(node_pid)" ]; then echo "node $NAME already running" >&2; return 0; fi
  rm -f "$PIDFILE"  # a stale pid file (after kill -9) would make `wait` return at once
  # shellcheck disable=SC2046
  as_rmq $(node_env) RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    "$RMQ_BIN/rabbitmq-server" -detached
  # `await_startup` fails at once while the node is not yet in epmd; `wait PIDFILE` waits for
  # the pid file, then for the app to be running.
  ctl wait "$PIDFILE" --timeout 120 >/dev/null
  ctl await_startup --timeout 120 >/dev/null  # `wait` has been seen to return a moment early
}

stop() {
  load
  if [ -z "$(node_pid)" ]; then return 0; fi
  ctl stop "$PIDFILE" >/dev/null  # with the pid file: returns once the OS process has gone
}

kill9() {
  load
  local pid
  pid=$(node_pid)
  if [ -z "$pid" ]; then return 0; fi
  kill -9 "$pid"
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
}

destroy() {
  if [ -f "$DIR/node.env" ]; then kill9; fi
  rm -rf "$DIR"
}

case "$CMD" in
  start) start "$@" ;;
  stop) stop ;;
  kill) kill9 ;;
  ctl) load; ctl "$@" ;;
  running) load; [ -n "$(node_pid)" ] ;;
  destroy) destroy ;;
  *) usage ;;
esac
