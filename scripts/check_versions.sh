#!/usr/bin/env bash
# Run the test suite against a chosen set of dependency versions, each in a fresh virtual environment.
#
#   scripts/check_versions.sh locked            the versions in constraints.txt (what the README's commands and CI install)
#   scripts/check_versions.sh latest [--write]  the newest versions every range in pyproject.toml admits; prints which
#                                               packages moved against constraints.txt; --write rewrites constraints.txt
#                                               from this environment when the suite passed (how the lock is refreshed)
#   scripts/check_versions.sh oldest            every direct dependency at its declared lower bound (scripts/lower_bounds.py)
#
# Extra arguments after the mode (and --write) go to pytest. The environment lives in $BIOSCALE_CHECK_DIR (default
# /tmp/bioscale-check-<mode>) and is made anew each run. torch stays at the CPU build the README pins (2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:?usage: scripts/check_versions.sh locked|latest|oldest [--write] [pytest args]}"
shift
write=0
if [[ "${1:-}" == "--write" ]]; then write=1; shift; fi
venv="${BIOSCALE_CHECK_DIR:-/tmp/bioscale-check-$mode}"
rm -rf "$venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
case "$mode" in
  locked) pip install -q -c constraints.txt torch==2.13.0 -e ".[dev]" ;;
  latest) pip install -q --upgrade torch==2.13.0 -e ".[dev]" ;;
  oldest)
    python3 scripts/lower_bounds.py dev > "$venv/lower-bounds.txt"
    pip install -q --prefer-binary -c "$venv/lower-bounds.txt" torch==2.13.0 -e ".[dev]" ;;
  *) echo "unknown mode $mode (locked, latest or oldest)" >&2; exit 2 ;;
esac
pip freeze --exclude-editable | grep -v -i -E '^(torch|bioscale)==' | sort -f > "$venv/freeze.txt"
echo "== $mode: packages that differ from constraints.txt (- locked, + here)" >&2
diff <(grep -v '^#' constraints.txt | sort -f) "$venv/freeze.txt" | grep -E '^[<>]' | sed 's/^</-/; s/^>/+/' >&2 || echo "(none)" >&2
set +e
python -m pytest -q "$@"
status=$?
set -e
if [[ $status -eq 0 && $write -eq 1 ]]; then
  { echo "# The exact versions CI tested (Python 3.11, CPU). Refresh: scripts/check_versions.sh latest --write"
    cat "$venv/freeze.txt"; } > constraints.txt
  echo "== constraints.txt rewritten from the $mode environment" >&2
fi
exit $status
