#!/usr/bin/env bash
# The test suite: unit tests and end-to-end tests with real QEMU guests in the lab (on SQLite, the default
# database), after the unit tests that use a controller database once more on PostgreSQL (scripts/pg.sh starts
# Debian's). The e2e suite runs on SQLite, but for the two controllers of test_leader_e2e.py, which share the
# PostgreSQL: a second 30-minute run would not fit CI's time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m kvmotion.cli.main image build
python3 -m kvmotion.cli.main image build --debian     # the disk-booted guest (BIOS and UEFI tests); cached
pg_rc=0
pg_url=""
started=$SECONDS
if pg_url="$(bash scripts/pg.sh)"; then
  # first, so that the full run's summary closes the output; its count of excused tests is the one CI reads
  KVMOTION_TEST_PG_URL="$pg_url" env -u KVMOTION_EXCUSED_FILE \
    python3 -m pytest -v -p no:cacheprovider -m db tests/unit || pg_rc=$?
else
  pg_rc=$?
fi
echo "PostgreSQL pass: exit status ${pg_rc}, $((SECONDS - started)) s"
rc=0
# the two-controller e2e test (tests/e2e/test_leader_e2e.py) shares that PostgreSQL; everything else stays on SQLite
KVMOTION_E2E_PG_URL="$pg_url" python3 -m pytest -v -p no:cacheprovider "$@" tests || rc=$?
if [ "$pg_rc" -ne 0 ]; then
  echo "the database tests failed on PostgreSQL (exit status ${pg_rc}; output above the full run)" >&2
  [ "$rc" -ne 0 ] || rc="$pg_rc"
fi
exit "$rc"
