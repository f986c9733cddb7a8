#!/usr/bin/env bash
# Create the Python environment of the MONAI Label server: bash monailabel_app/setup_venv.sh [VENV_DIR]
#
# A virtual environment of its own (default: <repo>/.venv-monailabel), not the project's: monailabel
# 0.8.5 pulls numpymaxflow 0.0.7 and pydicom-seg 0.4.1, which need numpy < 2 (the project runs numpy 2),
# pydicom-seg also pins jsonschema < 4 (the project's dev extra needs >= 4), and monailabel imports
# torchvision at start, which no torchvision release on PyPI does next to the CPU build of torch 2.13.0
# ("operator torchvision::nms does not exist"). See monailabel_app/README.md.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$REPO/.venv-monailabel}"
PY="${PYTHON:-python3}"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch and torchvision first, as a matching pair (pip takes both from this machine's disk where they lie there)
"$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# pydicom < 3: pydicom-seg 0.4.1 imports pydicom._storage_sopclass_uids, which pydicom 3 removed; without
# the pin the server does not start (MONAILabel issue 1841)
"$VENV/bin/python" -m pip install -q "monailabel==0.8.5" "monai==1.6.1" "pydicom<3" -e "$REPO"
"$VENV/bin/python" -c "import monailabel, monai, torch, numpy, common.data; from monailabel.tasks.infer.bundle import BundleInferTask; print('monailabel', monailabel.__version__, '| monai', monai.__version__, '| torch', torch.__version__, '| numpy', numpy.__version__)"
echo "MONAI Label environment ready: $VENV (start the server with $VENV/bin/monailabel start_server ...)"
