#!/usr/bin/env bash
# A real install: build the wheel, install it into a clean venv (CPU torch first) and use it from
# outside the source tree, so a file missing from the package data or an import that only works
# from the checkout fails here and not on a user's machine.
#
# The venv is cached between runs, keyed by what decides its third-party contents (the Python and
# torch versions and the wheel's Requires-Dist lines): a dependency change builds a fresh one, any
# other change reinstalls only the package (pip removes the old version's files first).
#
#   scripts/check_wheel.sh                     # uses .venv/bin/python to build
#   PYTHON=python3 scripts/check_wheel.sh      # another build interpreter (needs `build`)
#   VLCLASSIFY_CHECK_CACHE=/tmp/c ...          # where the cached venv lives
#   BASE_PYTHON=python3.11 ...                 # the interpreter the venv is made from
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CACHE="${VLCLASSIFY_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vlclassify-check}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
step() { printf '[check_wheel %3ds] %s\n' "$SECONDS" "$*"; }
fail() {
  echo "check_wheel: FAIL: $*" >&2
  exit 1
}

# 1. Build from the files git would ship (tracked + new, not ignored): stale build/ output or
# untracked junk in the work tree cannot leak into the wheel.
step "build the wheel"
mkdir "$TMP/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -co --exclude-standard -- pyproject.toml README.md LICENSE src |
    while read -r f; do [ -e "$f" ] && printf '%s\n' "$f"; done | tar -cf - -T -) | tar -xf - -C "$TMP/src"
else
  cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/src" "$TMP/src/"
  find "$TMP/src" -name __pycache__ -prune -exec rm -rf {} +
fi
SOURCE_DATE_EPOCH=315532800 "$PY" -m build --wheel --outdir "$TMP/dist" "$TMP/src" >"$TMP/build.log" 2>&1 ||
  { cat "$TMP/build.log" >&2; fail "python -m build --wheel failed"; }
WHEEL="$(ls "$TMP"/dist/*.whl)"

# 2. Every file of the package in the source tree must be in the wheel (code and data alike).
step "compare $(basename "$WHEEL") with src/vlclassify"
"$PY" - "$WHEEL" "$TMP/src/src" <<'EOF'
import sys, zipfile
from pathlib import Path
wheel, src = sys.argv[1], Path(sys.argv[2])
shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("vlclassify/")}
expected = {p.relative_to(src).as_posix() for p in (src / "vlclassify").rglob("*") if p.is_file()}
missing = sorted(expected - shipped)
if missing:
    sys.exit(f"check_wheel: FAIL: {len(missing)} file(s) of src/vlclassify are not in the wheel: {', '.join(missing)}")
print(f"  {len(shipped)} package files in the wheel, none missing")
EOF

# 3. The venv: reused while the dependency set is the same.
BASE_PY="${BASE_PYTHON:-python3}"
KEY="$("$BASE_PY" - "$WHEEL" "$TORCH_SPEC" <<'EOF'
import hashlib, sys, zipfile
wheel, torch_spec = sys.argv[1], sys.argv[2]
z = zipfile.ZipFile(wheel)
meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
deps = sorted(l for l in meta.splitlines() if l.startswith("Requires-Dist:"))
print(hashlib.sha256("\n".join([sys.version, torch_spec, *deps]).encode()).hexdigest()[:16])
EOF
)"
VENV="$CACHE/wheel-venv-$KEY"
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9 # one run at a time uses the cached venv
for old in "$CACHE"/wheel-venv-*; do
  [ -d "$old" ] && [ "$old" != "$VENV" ] && rm -rf "$old" # a stale dependency set
done
pip_install() {
  "$VENV/bin/python" -m pip install -q --no-compile "$@" >"$TMP/pip.log" 2>&1 ||
    { grep -v 'is ignored' "$TMP/pip.log" >&2; fail "pip install $*"; }
}
if [ ! -f "$VENV/.ready" ]; then
  step "fresh venv $VENV ($TORCH_SPEC first, then the wheel and its dependencies)"
  rm -rf "$VENV" "$CACHE/features"
  "$BASE_PY" -m venv "$VENV"
  pip_install "$TORCH_SPEC"
  pip_install "$WHEEL"
  touch "$VENV/.ready"
else
  step "cached venv $VENV: reinstall the package only"
  pip_install --no-deps --force-reinstall "$WHEEL"
fi
"$VENV/bin/python" -m pip check >"$TMP/pip-check.log" 2>&1 || { cat "$TMP/pip-check.log" >&2; fail "pip check"; }
"$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.version.cuda is None else "a CUDA torch was installed")'

# 4. Use it from outside the source tree, as a user would.
step "import vlclassify and every module, from $TMP/run"
mkdir "$TMP/run"
cd "$TMP/run"
unset PYTHONPATH
# The feature cache lives beside the venv (a cold one costs ~40 s of text and image encoding; its
# keys include the weights and data fingerprints, so a reused entry is always a valid one).
export VLCLASSIFY_CACHE="$CACHE/features"
BIN="$VENV/bin"
"$BIN/python" - "$ROOT" <<'EOF'
import importlib, pkgutil, sys
from pathlib import Path
import vlclassify
from vlclassify.data.descriptions import builtin_descriptions
root, here = Path(sys.argv[1]).resolve(), Path(vlclassify.__file__).resolve()
if here.is_relative_to(root):
    sys.exit(f"check_wheel: FAIL: vlclassify was imported from the checkout ({here}), not the install")
mods = [m.name for m in pkgutil.walk_packages(vlclassify.__path__, "vlclassify.")]
for name in mods:
    importlib.import_module(name)  # a module importing something only the checkout has fails here
assert (here.parent / "py.typed").is_file(), "py.typed is not installed"
assert builtin_descriptions("tuxpaint") and builtin_descriptions("fashion-mnist"), "built-in descriptions"
print(f"  import vlclassify {vlclassify.__version__} from {here.parent}; {len(mods)} modules import")
EOF
step "vlclassify methods, fit -m zero-shot --data tuxpaint, predict"
"$BIN/vlclassify" methods >"$TMP/methods.txt" || fail "vlclassify methods"
grep -q zero-shot "$TMP/methods.txt" || { cat "$TMP/methods.txt"; fail "vlclassify methods does not list zero-shot"; }
"$BIN/vlclassify" fit -m zero-shot --data tuxpaint --out "$TMP/zs" >"$TMP/fit.log" 2>&1 ||
  { cat "$TMP/fit.log" >&2; fail "vlclassify fit -m zero-shot --data tuxpaint"; }
tr '\r' '\n' <"$TMP/fit.log" | grep -E 'validation accuracy' | sed 's/^ */  /'
IMG="$("$BIN/python" -c 'from vlclassify.data import tuxpaint; print(tuxpaint()["all"].items[0].image.path)')"
"$BIN/vlclassify" predict "$TMP/zs" "$IMG" --top 3 >"$TMP/predict.txt" 2>&1 ||
  { cat "$TMP/predict.txt" >&2; fail "vlclassify predict"; }
grep -q '%' "$TMP/predict.txt" || { cat "$TMP/predict.txt"; fail "vlclassify predict printed no class"; }
sed 's/^/  /' "$TMP/predict.txt"
step "ok"
