"""The Triton causal conv (bamba_ft/ops/conv_triton.py) against the torch reference, in Triton's CPU interpreter.

The interpreter has to be chosen before Triton is imported, so the checks (tests/unit/conv_triton_check.py) run in
a process of their own. The GPU test (tests/gpu/test_cuda_paths.py) compares the kernels with causal-conv1d.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_triton_conv_matches_the_reference_forward_and_backward_in_the_interpreter() -> None:
    pytest.importorskip("triton", reason="Triton is not installed (it comes with CUDA builds of torch)")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "tests.unit.conv_triton_check"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok") == 6 + 4  # six cases at the first block shape, the others on one
