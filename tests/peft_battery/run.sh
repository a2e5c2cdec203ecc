#!/usr/bin/env bash
# Run peft's own generic test battery (tests/test_custom_models.py of the installed peft's sdist, from PyPI)
# with NOLA cases added. Nothing of peft's is stored in this repo: the sdist is fetched at run time.
#   tests/peft_battery/run.sh [WORK_DIR] [extra pytest args]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-$(mktemp -d)}
shift || true
python=${PYTHON:-python}
version=$("$python" -c "import peft; print(peft.__version__)")
if [[ ! -d "$work/peft-$version" ]]; then
    "$python" -m pip download -q --no-deps --no-binary :all: -d "$work/sdist" "peft==$version"
    tar -xzf "$work/sdist/peft-$version.tar.gz" -C "$work"
fi
battery="$work/battery"
mkdir -p "$battery/tests" "$battery/diffusers"
cp "$work/peft-$version/tests/"{test_custom_models.py,testing_common.py,testing_utils.py} "$battery/tests/"
touch "$battery/tests/__init__.py"
cp "$here/battery_conftest.py" "$battery/tests/conftest.py"
# testing_common imports diffusers only for isinstance() checks that never match custom models
echo "class StableDiffusionPipeline: pass" > "$battery/diffusers/__init__.py"
"$python" "$here/add_nola_cases.py" "$battery" >/dev/null
cd "$battery"
PYTHONPATH="$battery" exec "$python" -m pytest tests/test_custom_models.py -p no:cacheprovider -k "nola or Nola" \
    -q -rf --tb=no -W ignore::DeprecationWarning -o addopts="" "$@"
