#!/usr/bin/env bash
# Creates ./.venv-eval, the environment of the lmms-eval tests and runs: the project's ./.venv (scripts/setup.sh)
# seen underneath, plus `pip install -e .[eval]` (lmms-eval and what it needs) resolved by pip against it.
# Safe to re-run: nothing is installed when pyproject.toml and this script are unchanged since the last run.
#
# Why a second environment: lmms-eval 0.7.3 pins av<16 (the test suite pins 18.1) and wandb==0.25, among others.
# The project accepts av>=14, so pip resolves both here (av 15.x) without touching .venv. A `.pth` line puts .venv's
# site-packages after this environment's own, so torch, transformers and the rest are reused (nothing re-downloaded)
# and only what lmms-eval adds or pins differently lands here. torch's metadata asks for triton 3.7.1, which pip
# installs here too; the copy is removed so that .venv's deliberate triton 3.6.0 (see setup.sh) is the one used.
#
# BASE_VENV / EVAL_VENV override the two locations.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_VENV="${BASE_VENV:-.venv}"
EVAL_VENV="${EVAL_VENV:-.venv-eval}"
[ -x "$BASE_VENV/bin/python" ] || bash scripts/setup.sh
site_of() { "$1/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
if [ ! -x "$EVAL_VENV/bin/python" ]; then
  "$("$BASE_VENV/bin/python" -c 'import sys; print(sys._base_executable)')" -m venv "$EVAL_VENV"
fi
base_site="$(cd "$(site_of "$BASE_VENV")" && pwd)"
eval_site="$(site_of "$EVAL_VENV")"
echo "$base_site" > "$eval_site/_videonsa_base_env.pth"

stamp="$EVAL_VENV/.videonsa-eval-stamp"
# what the resolution depends on: the project's metadata, this script, and what .venv holds
inputs() { cat pyproject.toml scripts/setup_eval.sh; "$BASE_VENV/bin/python" -m pip freeze --disable-pip-version-check 2>/dev/null; }
want="$(inputs | sha256sum | cut -d' ' -f1) $(pwd)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$EVAL_VENV/bin/python" -c "import lmms_eval" 2>/dev/null; then
  echo "eval set-up ok (unchanged): $EVAL_VENV"
  exit 0
fi
# (the filter drops pip's notes about this machine's file:// package mirrors, which are noise here)
pip() { "$EVAL_VENV/bin/python" -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
start=$SECONDS
pip install -q -e ".[eval]"
if [ -d "$eval_site/triton" ]; then
  pip uninstall -q -y triton
fi
"$EVAL_VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import av, lmms_eval, torch, transformers, triton

names = [ep.name for ep in md.entry_points(group="lmms_eval.models")]
assert "videonsa" in names, f"the videonsa entry point is not installed (lmms_eval.models: {names})"
print(f"eval set-up ok: lmms-eval {md.version('lmms-eval')}, av {av.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, triton {triton.__version__}")
EOF
echo "$want" > "$stamp"
echo "eval set-up took $((SECONDS - start)) s"
