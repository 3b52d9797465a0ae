#!/usr/bin/env bash
# The Bicep under infra/: every file parses (pycep-parser) and passes checkov's Bicep checks, each
# suppression justified where it is made. Both tools come from PyPI into a virtualenv under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/infra-tools
bash scripts/install-infra-tools.sh all
"$venv/bin/python" - <<'PY'
import pathlib, sys
from pycep import BicepParser
files = sorted(pathlib.Path("infra").rglob("*.bicep"))
if not files:
    sys.exit("no .bicep files under infra/")
bad = 0
for f in files:
    try:
        tree = BicepParser().parse(text=f.read_text())
        assert tree, "empty"
        print(f"parsed {f}")
    except Exception as e:  # noqa: BLE001 - report every file's error, then fail
        bad += 1
        print(f"PARSE ERROR {f}: {e}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
# Parsing errors count as failures too (checkov alone would only report them).
out=$("$venv/bin/checkov" -d infra --framework bicep --skip-download --compact --quiet -o json 2>/dev/null || true)
echo "$out" | "$venv/bin/python" -c '
import json, sys
d = json.load(sys.stdin)
d = d[0] if isinstance(d, list) else d
s = d["summary"]
print("checkov: %(passed)s passed, %(failed)s failed, %(skipped)s skipped (justified inline), %(parsing_errors)s parsing errors" % s)
for r in d["results"].get("failed_checks", []):
    print("  FAILED %s %s - %s:%s" % (r["check_id"], r["check_name"], r["file_path"], r["file_line_range"]))
sys.exit(1 if s["failed"] or s["parsing_errors"] else 0)
'
