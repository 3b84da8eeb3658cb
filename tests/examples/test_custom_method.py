"""examples/custom_method.py: a new method in one file, on the public API only, runs and checks itself."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_custom_method_example_runs_on_the_public_api():
    example = ROOT / "examples" / "custom_method.py"
    source = example.read_text()
    assert "from fxpeft." not in source.replace("from fxpeft import", "")  # public API only
    proc = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "save -> load bit-exact" in proc.stdout
