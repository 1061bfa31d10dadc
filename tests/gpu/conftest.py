"""GPU test settings: Triton's autotuners take the first configuration that works.

mamba-ssm's SSD kernels autotune over 183 configurations in 25 autotuners, and Triton compiles every
configuration it benchmarks, again for each new shape and dtype: on a fresh machine the tests spend minutes
compiling before each one runs. The tests check numbers, not speed, so during them each autotuner runs its
configurations in order and keeps the first that compiles and runs, compiling no other. Triton's own
autotuning: BAMBA_FT_TEST_AUTOTUNE=full.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from bamba_ft.ops.kernels import autotuners
from tests.gpu.autotune import first_fit


@pytest.fixture(scope="session", autouse=True)
def _first_fit_autotuning() -> Iterator[None]:
    if os.environ.get("BAMBA_FT_TEST_AUTOTUNE") == "full" or not torch.cuda.is_available():
        yield
        return
    from bamba_ft.ops.kernels import mamba_ssm_kernels

    if mamba_ssm_kernels():  # imports mamba-ssm's kernel modules
        for tuner in autotuners(("mamba_ssm.",)):
            first_fit(tuner)
    yield
