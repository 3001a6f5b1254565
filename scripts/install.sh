#!/usr/bin/env bash
# Installs what kvmotion needs on a Debian 12 host, skipping what is already there. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
# debootstrap .. e2fsprogs: `kvmotion image build --debian` (GRUB comes from the guest's own packages); ovmf: UEFI guests; genisoimage: cloud-init seed ISOs
# libpq5: the PostgreSQL client library psycopg uses (the PostgreSQL server the tests use: scripts/pg.sh)
# chromium: the web client's browser tests (tests/e2e/test_webui_e2e.py drive it with Playwright, no browser download)
PKGS=(qemu-system-x86 qemu-utils busybox-static cpio kmod iproute2 iputils-ping tcpdump
      debootstrap fdisk dosfstools mtools e2fsprogs ovmf genisoimage libpq5 chromium)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
here="$(pwd)/src/kvmotion"
if ! python3 -c "import sys, kvmotion, kvmotion_lab, qemu.qmp, fastapi, uvicorn, sqlalchemy, alembic, psycopg, prometheus_client, httpx, websockets, typer, rich, yaml, pytest, pytest_timeout, schemathesis, matplotlib, playwright
sys.exit(0 if kvmotion.__path__[0] == sys.argv[1] and kvmotion_lab.__path__[0] == sys.argv[1] + '_lab' else 1)" "$here" 2>/dev/null; then
  python3 -m pip install -q --disable-pip-version-check -e ".[test]"
fi
