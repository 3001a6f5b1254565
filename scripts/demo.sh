#!/usr/bin/env bash
# The demo: a real live migration in the lab. Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec python3 -m kvmotion.cli.main demo "$@"
