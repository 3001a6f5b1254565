#!/usr/bin/env bash
# The test suite: unit tests and end-to-end tests with real QEMU guests in the lab.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m kvmotion.cli.main image build
python3 -m kvmotion.cli.main image build --debian     # the disk-booted guest (BIOS and UEFI tests); cached
exec python3 -m pytest -v -p no:cacheprovider "$@" tests
