# Helpers sourced by scripts/test.sh: a private PostgreSQL cluster on loopback for the tests.
#
# start_postgres exports
#   AUTOPRUNE_TEST_PG_URL  postgresql+psycopg://autoprune:autoprune-test@127.0.0.1:PORT (role with CREATEDB;
#                          each test creates and drops its own databases)
#   AUTOPRUNE_TEST_PG_CTL  a shell command line (split it with shlex) running this cluster's pg_ctl with its
#                          data dir, log file and server options: append stop / start / restart and flags.
# The cluster lives in its own directory (several checkouts may run their suites at once) on port
# PG_PORT (55432) or, when that one is taken, on a free port; stop_postgres stops it and removes the directory.
PG_PORT=${PG_PORT:-55432}

_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_port_taken() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start_postgres() {
  local pgbin run="" opts
  if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || return 1
    else
      return 1
    fi
  fi
  pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  if [ "$(id -u)" = 0 ]; then run="runuser -u postgres --"; fi
  if _port_taken "$PG_PORT"; then PG_PORT=$(_free_port); fi
  PG_DIR=$(mktemp -d /tmp/autoprune-pg.XXXXXX) || return 1
  chmod 700 "$PG_DIR"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$PG_DIR"; fi
  $run "$pgbin/initdb" -D "$PG_DIR/data" -U postgres -E UTF8 --locale=C.UTF-8 --no-sync \
      --auth-local=trust --auth-host=scram-sha-256 >/dev/null || return 1
  opts="-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR -c fsync=off"
  export AUTOPRUNE_TEST_PG_CTL="$run $pgbin/pg_ctl -D $PG_DIR/data -l $PG_DIR/server.log -w -t 60 -o '$opts'"
  eval "$AUTOPRUNE_TEST_PG_CTL start" >/dev/null || return 1
  $run "$pgbin/psql" -h "$PG_DIR" -p "$PG_PORT" -U postgres -q \
      -c "CREATE ROLE autoprune LOGIN CREATEDB PASSWORD 'autoprune-test'" >/dev/null || return 1
  export AUTOPRUNE_TEST_PG_URL="postgresql+psycopg://autoprune:autoprune-test@127.0.0.1:$PG_PORT"
  echo "PostgreSQL on 127.0.0.1:$PG_PORT ($PG_DIR)"
}

stop_postgres() {
  if [ -n "${AUTOPRUNE_TEST_PG_CTL:-}" ]; then
    eval "$AUTOPRUNE_TEST_PG_CTL stop -m fast" >/dev/null 2>&1 || true
  fi
  if [ -n "${PG_DIR:-}" ] && [ -d "$PG_DIR" ]; then rm -rf "$PG_DIR"; fi
}

# Debian's chromium for the browser tests (tests marked 'browser' skip without it). Playwright drives it
# through executable_path=/usr/bin/chromium: never 'playwright install' (it downloads a browser build).
install_chromium() {
  [ -x /usr/bin/chromium ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1) || true
  fi
  return 0
}
