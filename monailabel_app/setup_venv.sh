#!/usr/bin/env bash
# Create the Python environment of the MONAI Label server. Two ways (see monailabel_app/README.md):
#
#   bash monailabel_app/setup_venv.sh [VENV_DIR]
#       full: a virtual environment of its own (default: <repo>/.venv-monailabel), everything monailabel 0.8.5
#       asks for, with torch 2.14.1 + torchvision 0.29.1 (CUDA build; ~8 GB). For a GPU server.
#   bash monailabel_app/setup_venv.sh --on BASE_VENV [VENV_DIR]
#       slim: a small environment on top of BASE_VENV, an existing environment of this project (made with the
#       README's install: torch, `pip install -e .`), whose packages it uses as they are (torch, numpy 2, monai,
#       ...); it adds monailabel 0.8.5 and only those of its requirements that the server imports to serve and
#       train these bundles (~400 MB, ~25 s). Default VENV_DIR: BASE_VENV-monailabel. CI uses it.
#
# Why not monailabel in the project's environment: monailabel 0.8.5 pulls numpymaxflow 0.0.7 and pydicom-seg
# 0.4.1, which pin numpy < 2 (the project runs numpy 2), pydicom-seg also pins jsonschema < 4 (the project's
# dev extra needs >= 4), and monailabel pulls torchvision, which no torchvision release on PyPI does next to
# the CPU build of torch 2.13.0 ("operator torchvision::nms does not exist"). The slim way leaves out what
# needs those pins (numpymaxflow: scribbles; sam2, torchvision: interactive and pathology models) and installs
# pydicom-seg (imported at start, used only for DICOM SEG) without its stale pins.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
BASE=""
if [ "${1:-}" = "--on" ]; then
    BASE="${2:?usage: setup_venv.sh --on BASE_VENV [VENV_DIR]}"
    shift 2
fi

if [ -z "$BASE" ]; then
    VENV="${1:-$REPO/.venv-monailabel}"
    PY="${PYTHON:-python3}"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch and torchvision first, as a matching pair (pip takes both from this machine's disk where they lie there)
    "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    # pydicom < 3: pydicom-seg 0.4.1 imports pydicom._storage_sopclass_uids, which pydicom 3 removed; without
    # the pin the server does not start (MONAILabel issue 1841)
    "$VENV/bin/python" -m pip install -q "monailabel==0.8.5" "monai==1.6.1" "pydicom<3" -e "$REPO"
else
    BASE="$(cd "$BASE" && pwd)"
    VENV="${1:-$BASE-monailabel}"
    [ -x "$BASE/bin/python" ] || { echo "no Python at $BASE/bin/python" >&2; exit 1; }
    "$BASE/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('torch', 'monai', 'common'))))" || {
        echo "$BASE is not an environment of this project (pip install torch, then pip install -e .)" >&2; exit 1; }
    # a venv without pip of its own: the base's pip (reached through the .pth file) installs into it
    "$BASE/bin/python" -m venv --without-pip "$VENV"
    site_dir="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    base_site="$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # the base's packages come after this environment's own; addsitedir also runs the base's .pth files
    # (the editable install of this project)
    echo "import site; site.addsitedir('$base_site')" >"$site_dir/_base_venv.pth"
    # the base's packages stay as they are: no package of it gets installed again in another version
    "$BASE/bin/python" -m pip freeze --exclude-editable | grep -v ' @ ' >"$VENV/base-constraints.txt"
    # what the server, its infer and train tasks import (monailabel's own version floors); where the base has
    # one already (fastapi, uvicorn, pydantic, requests, google-auth, ... come with mlflow), pip keeps it
    "$VENV/bin/python" -m pip install -q -c "$VENV/base-constraints.txt" \
        "fastapi>=0.110.2" "uvicorn>=0.29.0" "pydantic>=2.7.0" "pydantic-settings>=2.2.1" "python-dotenv>=1.0.1" \
        "python-multipart>=0.0.9" "schedule>=1.2.1" "timeloop>=1.0.2" "watchdog>=4.0.0" "expiring_dict>=1.1.0" \
        "cachetools>=5.3.3" "filelock>=3.11.0" "passlib>=1.7.4" "pyjwt>=2.8.0" "requests>=2.31.0" \
        "requests-toolbelt>=1.0.0" "google-auth>=2.29.0" "dicomweb-client>=0.59.1" "pydicom>=2.4.4,<3" \
        "pynrrd>=1.0.0" "girder-client>=3.2.3" "shapely>=2.0.4" "scikit-image" "psutil" "SimpleITK" "jsonschema"
    # without their dependencies: monailabel's full list (above: the part it needs here), pydicom-seg's stale
    # pins (numpy < 2, jsonschema < 4; its imports SimpleITK, pydicom < 3 and jsonschema are above)
    "$VENV/bin/python" -m pip install -q --no-deps "monailabel==0.8.5" "pydicom-seg==0.4.1"
fi
# the server's imports, the app's included (its main.py stands in for torchvision where that does not import)
"$VENV/bin/python" -c "import sys; sys.path.insert(0, '$REPO/monailabel_app'); import main, monailabel.app, common.data, \
monailabel, monai, torch, numpy; print('monailabel', monailabel.__version__, '| monai', monai.__version__, '| torch', \
torch.__version__, '| numpy', numpy.__version__)"
echo "MONAI Label environment ready: $VENV (start the server with $VENV/bin/monailabel start_server ...)"
