"""Commands that never compute metrics do not pay for importing sklearn and scipy (~1.3 s)."""

from __future__ import annotations

import subprocess
import sys


def test_train_update_and_predict_paths_import_neither_sklearn_nor_scipy():
    code = (
        "import sys, hamacho, hamacho.cli, hamacho.engine, hamacho.grow.flows, hamacho.predicting;"
        "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
