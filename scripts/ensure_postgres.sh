#!/usr/bin/env bash
# Makes sure PostgreSQL's server binaries are installed, for the test that runs a Prefect
# server on PostgreSQL (tests/flows/test_postgres_deployment.py starts its own throwaway
# server with initdb/pg_ctl). Called by `make install`; never fails the install: where
# they cannot be installed it says so in one line and that test skips, naming the reason.
set -euo pipefail

have_initdb() {
    command -v initdb >/dev/null 2>&1 && return 0
    # Debian/Ubuntu install the server binaries off PATH, one directory per version.
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

skip() { echo "ensure_postgres: $1; the PostgreSQL tests will be skipped"; exit 0; }

have_initdb && exit 0
command -v apt-get >/dev/null 2>&1 || skip "no initdb found and no apt-get to install it"
[ "$(id -u)" -eq 0 ] || skip "no initdb found and not root (run: sudo apt-get install postgresql)"

echo "ensure_postgres: installing PostgreSQL (apt-get install postgresql)"
export DEBIAN_FRONTEND=noninteractive
install() { apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }
# A fresh image may have no package lists yet: update only when the first try fails.
install || { apt-get update -qq && install; } \
    || skip "apt-get install postgresql failed"
have_initdb || skip "postgresql installed but no initdb found"
