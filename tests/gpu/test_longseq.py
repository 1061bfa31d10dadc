"""Long rows on the CUDA kernels (`pytest -m gpu`): pieces against one call, and a Bamba-9B layer at 131,072 tokens.

Relative Frobenius errors as in test_cuda_paths.py. The pieces run the same kernels as the single call, on the
same chunks; only the carried state is rounded differently (float32 between pieces, the input dtype inside).
"""

from __future__ import annotations

import pytest
import torch

from bamba_ft.model.mixer import install_mixer
from bamba_ft.ops import longseq
from bamba_ft.ops.kernels import KernelOps
from bamba_ft.ops.mamba2 import fused_conv_scan_ok, mixer_forward
from tests.conftest import make_model
from tests.gpu.test_cuda_paths import SHAPE, kernels_required, rel

pytestmark = pytest.mark.gpu
PIECE = 128  # tokens per piece under the lowered limit (two chunks of 64)
LENGTHS = [128, 127, 2, 124, 1, 6, 300, 3, 77]  # boundaries at 128 (a split), 255, 257, 381, 382 (in a halo), ...


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("packed", [False, True])
def test_kernel_mixer_in_pieces_matches_one_call(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, tol: float,
                                                 packed: bool) -> None:
    kernels_required()
    model = make_model(torch.float32, **SHAPE).cuda().to(dtype)
    mixer = model.model.layers[0].mamba
    install_mixer(model, "auto")
    assert fused_conv_scan_ok(mixer)
    t = sum(LENGTHS)
    seq = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))[None].cuda() if packed else None
    torch.manual_seed(0)
    h = torch.randn(1, t, model.config.hidden_size, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn_like(h)
    params = dict(mixer.named_parameters())
    calls = []
    monkeypatch.setattr(KernelOps, "scan_fwd_state", _counting(KernelOps.scan_fwd_state, calls))
    runs = []
    for limit in (longseq.OFFSET_LIMIT, mixer.in_proj.out_features * (PIECE + 4)):
        monkeypatch.setattr(longseq, "OFFSET_LIMIT", limit)
        y = mixer_forward(mixer, h, seq_idx=seq)
        runs.append((y, *torch.autograd.grad((y * w).sum(), [h, *params.values()])))
    assert len(calls) == -(-t // PIECE), "the second run went through the pieces"
    for name, a, b in zip(["output", "input", *params], runs[1], runs[0]):
        assert rel(a, b) < tol, name


def _counting(fn, calls: list):  # noqa: ANN001, ANN202
    def wrapped(*args):  # noqa: ANN002, ANN202
        calls.append(1)
        return fn(*args)

    return staticmethod(wrapped)


def test_bamba_9b_mixer_at_131072_tokens_matches_its_last_sequence_alone() -> None:
    """Past 2^31 elements of in_proj output: the last 4,096-token sequence of a packed row, against itself alone."""
    kernels_required()
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs about 40 GiB of GPU memory")
    from bamba_ft.ops.longseq_probe import case_layer

    row = case_layer(131_072, packed=True, pieces=True)
    assert not any(row["nonfinite"].values()), row["nonfinite"]
    for name, err in row["last_seq_rel_err"].items():
        assert err < 2e-2, (name, err)
