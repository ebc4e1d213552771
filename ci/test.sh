#!/usr/bin/env bash
# CI checks the README's promise that a fresh machine passes its two commands:
#  1. install as the README says, in a fresh venv, and run the lint/type gate (ruff, mypy);
#  2. run the README's test command with every optional tool (QEMU, dtc, ncat, aarch64
#     binutils, acpica) hidden from PATH, so nothing in the default suite can need them;
#  3. run the `optional_tool` tests again with the real PATH, where any such tool exists;
#  4. install non-editably (`pip install .`) into a second fresh venv and, from outside the
#     checkout, boot the packaged hello guest and ask `hv bench blk --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Optional tools, as globs (tests/helpers.py TOOLS lists each with its install command).
DENY=(qemu-system-* qemu-img dtc ncat aarch64-linux-gnu-* iasl acpidump kstool)

step() { printf '\n=== %s\n' "$*"; }

# A PATH that lists one directory of symlinks to every program of the current PATH (first
# one wins, as in a lookup) except the deny-list. The venv's bin stays a real directory in
# front so its python finds its pyvenv.cfg.
masked_path() {
    local venv_bin=$1 mask=$WORK/masked-bin dir prog name pattern denied
    mkdir -p "$mask"
    local IFS=:
    for dir in $PATH; do
        [ -d "$dir" ] && [ "$dir" != "$venv_bin" ] || continue
        for prog in "$dir"/*; do
            name=${prog##*/}
            [ -x "$prog" ] && [ ! -d "$prog" ] && [ ! -e "$mask/$name" ] || continue
            denied=0
            for pattern in "${DENY[@]}"; do
                # shellcheck disable=SC2053  # glob match on purpose
                [[ $name == $pattern ]] && denied=1 && break
            done
            [ "$denied" = 1 ] || ln -s "$prog" "$mask/$name"
        done
    done
    printf '%s:%s' "$venv_bin" "$mask"
}

step "README: install (fresh venv)"
python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
python -m pip install --quiet --upgrade pip
pip install -e '.[test]'

step "lint and type gate (ruff, mypy; rules in pyproject.toml)"
ruff check hv backends fixtures
mypy   # the packages to check are in [tool.mypy]

step "README: test, optional tools hidden"
HIDDEN_PATH=$(masked_path "$WORK/venv/bin")
PATH=$HIDDEN_PATH python - <<'EOF'
import shutil
from tests.helpers import TOOLS
visible = [tool for tool, spec in TOOLS.items() if spec.optional and shutil.which(tool)]
assert not visible, f"the masked PATH still shows optional tools: {visible}"
assert shutil.which("gcc") and shutil.which("python"), "the masked PATH lost required programs"
print("masked PATH hides:", ", ".join(t for t, s in TOOLS.items() if s.optional))
EOF
PATH=$HIDDEN_PATH python -m pytest -n 2

step "optional tools, real PATH"
PRESENT=$(python -c 'import shutil; from tests.helpers import TOOLS
print(" ".join(t for t, s in TOOLS.items() if s.optional and shutil.which(t)))')
if [ -n "$PRESENT" ]; then
    echo "installed: $PRESENT"
    python -m pytest -n 2 -m optional_tool
else
    echo "no optional tool is installed here: nothing more to run"
fi
deactivate

step "non-editable install, run from outside the checkout"
python3 -m venv "$WORK/venv-installed"
"$WORK/venv-installed/bin/python" -m pip install --quiet --upgrade pip
"$WORK/venv-installed/bin/python" -m pip install --quiet "$ROOT"
mkdir "$WORK/elsewhere"
(
    cd "$WORK/elsewhere"
    . "$WORK/venv-installed/bin/activate"
    # every package of the checkout must have been installed (the list in pyproject.toml)
    (cd "$ROOT" && find hv backends fixtures -name __init__.py) \
        | sed -e 's|/__init__.py$||' -e 's|^backends|hv_backends|' -e 's|^fixtures|hv_fixtures|' -e 's|/|.|g' \
        | xargs python -c 'import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]' \
        || { echo "a package of the checkout is missing from the installed hv (pyproject.toml packages)"; exit 1; }
    kernel=$(python -c 'import hv_fixtures; print(hv_fixtures.guest("x86_64", "hello"))')
    case $kernel in "$ROOT"/*) echo "hv_fixtures comes from the checkout: $kernel"; exit 1;; esac
    out=$(timeout 120 hv -machine q35 -kernel "$kernel" -append hi -serial stdio -accel unicorn </dev/null)
    printf '%s\n' "$out"
    grep -qx 'hello from hv guest (x86_64)' <<<"$out" && grep -qx 'cmdline: hi' <<<"$out" \
        || { echo "the installed hv did not run the hello guest"; exit 1; }
    hv bench blk --help >/dev/null || { echo "'hv bench blk --help' failed"; exit 1; }
    echo "installed hv: hello guest and 'hv bench blk --help' ok"
)
