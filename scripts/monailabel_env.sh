#!/usr/bin/env bash
# Create (or update) the MONAI Label environment .venv-monailabel for bundle/monailabel/.
#
# MONAI Label 0.8.5 pins numpy<2 (through numpymaxflow and pydicom-seg) and breaks with pydicom 3,
# which clashes with the main environment (.venv: numpy 2, pydicom 3). It therefore gets its own
# environment, with medad installed editable so that the app runs this checkout's library, and
# dcmqi (its itkimage2segimage writes a label saved to a DICOMweb datastore as DICOM SEG; without
# it MONAI Label would download dcmqi from GitHub when it starts).
#
#   scripts/monailabel_env.sh
#   PYTHON=python3.11 MONAILABEL_VENV=/opt/medad-monailabel scripts/monailabel_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${MONAILABEL_VENV:-.venv-monailabel}

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# One resolver run, so that medad's requirements (numpy>=1.24, torch, monai, open_clip, ...) are
# resolved together with MONAI Label's pins instead of one install undoing the other.
"$VENV/bin/python" -m pip install --quiet "monailabel==0.8.5" "pydicom<3" dcmqi -e .
"$VENV/bin/python" - <<'PY'
import shutil, sys
from pathlib import Path

import medad, monai, monailabel, numpy, pydicom, torch

assert shutil.which("itkimage2segimage", path=str(Path(sys.executable).parent)), "dcmqi's itkimage2segimage is missing"

print(f"monailabel {monailabel.__version__}, medad {medad.__version__}, monai {monai.__version__}, "
      f"torch {torch.__version__}, numpy {numpy.__version__}, pydicom {pydicom.__version__}")
PY
echo "MONAI Label environment ready: $VENV (see bundle/monailabel/README.md to start the server)"
