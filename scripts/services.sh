# Helpers sourced by scripts/test.sh: a private PostgreSQL cluster on loopback for the tests.
PG_DIR=${PG_DIR:-/tmp/autoprune-pg}
PG_PORT=${PG_PORT:-55432}

start_postgres() {
  local pgbin
  if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || return 1
    else
      return 1
    fi
  fi
  pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  local run="" 
  if [ "$(id -u)" = 0 ]; then run="runuser -u postgres --"; fi
  rm -rf "$PG_DIR"; install -d -m 700 "$PG_DIR"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$PG_DIR"; fi
  $run "$pgbin/initdb" -D "$PG_DIR/data" -U postgres -E UTF8 --locale=C.UTF-8 --no-sync \
      --auth-local=trust --auth-host=scram-sha-256 >/dev/null || return 1
  $run "$pgbin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 30 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR -c fsync=off" start >/dev/null || return 1
  $run "$pgbin/psql" -h "$PG_DIR" -p "$PG_PORT" -U postgres -q \
      -c "CREATE ROLE autoprune LOGIN CREATEDB PASSWORD 'autoprune-test'" >/dev/null || return 1
  export AUTOPRUNE_TEST_PG_URL="postgresql+psycopg://autoprune:autoprune-test@127.0.0.1:$PG_PORT"
  export AUTOPRUNE_TEST_PG_CTL="$run $pgbin/pg_ctl -D $PG_DIR/data"
  echo "PostgreSQL on 127.0.0.1:$PG_PORT"
}

stop_postgres() {
  if [ -n "${AUTOPRUNE_TEST_PG_CTL:-}" ]; then
    $AUTOPRUNE_TEST_PG_CTL -m fast stop >/dev/null 2>&1 || true
  fi
}
