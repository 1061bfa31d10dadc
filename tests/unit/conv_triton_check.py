"""Checks of the Triton causal conv against the torch reference; run by tests/unit/test_conv_triton.py in a process
with TRITON_INTERPRET=1 (Triton's CPU interpreter, which must be chosen before Triton is imported)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from bamba_ft.ops.conv_triton import BLOCKS, conv_bwd, conv_fwd
from bamba_ft.ops.scan_ref import segment_conv1d

ROWS, TOKENS, CHANNELS = 2, 70, 24  # three token blocks, the last partial; one partial channel block
LENGTHS = [None, [[1, 40, 3, 26], [70]], [[31, 1, 1, 37], [33, 32, 5]]]  # boundaries at and beside block edges


def check(lengths: list | None, bias: bool, block: tuple[int, int, int]) -> None:
    """float32, 1e-5 absolute and relative: both accumulate in float32, in different orders. The interpreter cannot
    time the autotuner's configurations, so each check runs one `block`."""
    torch.manual_seed(0)
    wide = torch.randn(ROWS, TOKENS, CHANNELS + 9)  # the conv input is a slice of a wider row
    x = wide[..., 5 : 5 + CHANNELS]
    weight, b = torch.randn(CHANNELS, 4), (torch.randn(CHANNELS) if bias else None)
    seq_idx = None
    if lengths is not None:
        seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
        seq_idx = seq_idx.to(torch.int32)
    dout = torch.randn(ROWS, TOKENS, CHANNELS)
    leaves = [v.detach().requires_grad_() for v in (x, weight, *([b] if bias else []))]
    ref = F.silu(segment_conv1d(leaves[0], leaves[1], leaves[2] if bias else None, seq_idx))
    ref_grads = torch.autograd.grad(ref, leaves, dout)

    y = conv_fwd(x.transpose(1, 2), weight, b, seq_idx, block=block)
    assert y.shape == (ROWS, CHANNELS, TOKENS) and y.stride(1) == 1, "channel-last, as causal-conv1d returns it"
    torch.testing.assert_close(y.transpose(1, 2), ref.detach(), rtol=1e-5, atol=1e-5)
    dx_buf = torch.full((ROWS, TOKENS, CHANNELS), float("nan"))
    dx, dw, db = conv_bwd(x.transpose(1, 2), weight, b, dout.transpose(1, 2), seq_idx, dx_buf.transpose(1, 2),
                          block=block)
    assert dx.data_ptr() == dx_buf.data_ptr(), "the input gradient goes into the given buffer"
    torch.testing.assert_close(dx_buf, ref_grads[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, ref_grads[1], rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(db, ref_grads[2], rtol=1e-5, atol=1e-5)
    else:
        assert db is None
    frozen = torch.full((ROWS, TOKENS, CHANNELS), float("nan"))
    assert conv_bwd(x.transpose(1, 2), weight, b, dout.transpose(1, 2), seq_idx, frozen.transpose(1, 2),
                    wgrad=False, block=block)[1:] == (None, None)
    torch.testing.assert_close(frozen, ref_grads[0], rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    cases = [(lengths, bias, BLOCKS[0]) for lengths, bias in itertools.product(LENGTHS, (True, False))]
    cases += [(LENGTHS[2], True, block) for block in BLOCKS[1:]]  # every block shape on the hardest rows
    for lengths, bias, block in cases:
        check(lengths, bias, block)
        print("ok", lengths, bias, block)
