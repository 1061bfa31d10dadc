"""Rows run in pieces (bamba_ft.ops.longseq) equal the same rows in one piece: float64, torch stand-ins for the
kernels (tests/unit/test_conv_scan.py's TorchOps), with `OFFSET_LIMIT` lowered so that rows of tens of tokens split.
"""

from __future__ import annotations

import pytest
import torch

from bamba_ft.ops import longseq
from bamba_ft.ops.mamba2 import conv_scan
from bamba_ft.ops.scan_ref import ssd_scan_torch
from tests.conftest import make_model
from tests.unit.test_conv_scan import TorchOps
from tests.unit.test_mixer import recurrence

PIECE = 16  # tokens per piece under the lowered limit (chunk size 8)
T = 53  # pieces [0, 16) [16, 32) [32, 48) [48, 53)


def ids_of(lengths: list[int], rows: int = 1) -> torch.Tensor:
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(torch.int32)
    return seq.expand(rows, -1).contiguous()


def lower_limit(monkeypatch: pytest.MonkeyPatch, cost: int, halo: int) -> None:
    """OFFSET_LIMIT such that `spans` makes pieces of PIECE tokens at `cost` elements per token."""
    monkeypatch.setattr(longseq, "OFFSET_LIMIT", cost * (PIECE + halo + 1))


def test_spans_cover_the_row_in_whole_chunks_within_the_limit() -> None:
    cost, chunk, halo = 16_768, 256, 3  # Bamba-9B: in_proj row stride
    for t in (131_072, 131_073, 262_144, 1_000_003):
        pieces = longseq.spans(t, cost, chunk, halo)
        assert pieces[0][0] == 0 and pieces[-1][1] == t
        assert all(e == s2 for (_, e), (s2, _) in zip(pieces, pieces[1:]))
        assert all(s % chunk == 0 for s, _ in pieces)
        assert max((e - s + halo) * cost for s, e in pieces) < 2**31
    assert longseq.spans(131_072, cost, chunk, halo) == [(0, 65_536), (65_536, 131_072)]
    assert not longseq.needs_pieces(1, 120_000, cost) and longseq.needs_pieces(1, 131_072, cost)


@pytest.mark.parametrize("lengths", [
    [T],  # one sequence: the state and the conv halo cross every split
    [16, 15, 2, 13, 1, 6],  # boundaries at a split (16), one before (31) and after (33) one, inside a halo (46, 47)
    [1, 30, 3, 19],  # a length-1 sequence at the start; boundaries at 31 and 34
])
def test_ssd_scan_in_pieces_with_carried_state_equals_one_scan(lengths: list[int]) -> None:
    """ssd_scan_torch's initial/final states: the scan of a row equals its pieces chained (and the recurrence)."""
    torch.manual_seed(0)
    b, h, p, g, n = 2, 4, 3, 2, 5
    x = torch.randn(b, T, h, p, dtype=torch.float64)
    dt, B, C = torch.randn(b, T, h, dtype=torch.float64), *torch.randn(2, b, T, g, n, dtype=torch.float64)
    A, D, dt_bias = -torch.rand(h, dtype=torch.float64) - 0.1, torch.randn(h, dtype=torch.float64), torch.randn(h, dtype=torch.float64)
    seq = ids_of(lengths, b) if len(lengths) > 1 else None
    whole = ssd_scan_torch(x, dt, A, B, C, 8, D=D, dt_bias=dt_bias, seq_idx=seq)
    torch.testing.assert_close(whole, recurrence(x, dt, A, B, C, D, dt_bias, seq), rtol=0, atol=1e-10)
    ys, state = [], None
    for s, e in [(0, 16), (16, 32), (32, 48), (48, T)]:
        ids = longseq._scan_ids(seq, 0, s, e) if seq is not None else None
        ids = ids.expand(b, -1) if ids is not None else None
        y, state = ssd_scan_torch(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], 8, D=D, dt_bias=dt_bias,
                                  seq_idx=ids, initial_states=state, return_final_states=True)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), whole, rtol=0, atol=1e-10)


def _conv_scan_grads(mixer, zxbcdt, seq, w, params):  # noqa: ANN001, ANN202
    _, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    y = conv_scan(mixer, xbc, dt, seq, ops=TorchOps)
    return y, torch.autograd.grad((y * w).sum(), [zxbcdt, *params])


@pytest.mark.parametrize("rows,lengths", [
    (1, [T]),  # one sequence: the state and the conv halo cross every split
    (1, [16, 15, 2, 13, 1, 6]),  # boundaries at a split (16), one before (31) and after (33) one, in a halo (46, 47)
    (1, [1, 30, 3, 19]),  # a length-1 sequence first; boundaries at 31 and 34
    (2, [3, 45, 5]),  # two rows with different boundaries (a padded batch)
])
def test_fused_conv_scan_in_pieces_equals_one_piece(monkeypatch: pytest.MonkeyPatch, rows: int,
                                                    lengths: list[int]) -> None:
    """Output and every gradient, float64, |diff| <= 1e-10; boundaries on, before and after splits and in halos."""
    model = make_model(torch.float64, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_chunk_size=8)
    mixer = model.model.layers[0].mamba
    torch.manual_seed(1)
    zxbcdt = torch.randn(rows, T, mixer.in_proj.out_features, dtype=torch.float64, requires_grad=True)
    seq = ids_of(lengths, rows) if len(lengths) > 1 else None
    if rows == 2 and seq is not None:  # a second row with other boundaries (padded-batch layout)
        seq[1] = ids_of([T - 20, 20])[0] + 5
    w = torch.randn(rows, T, mixer.num_heads, mixer.head_dim, dtype=torch.float64)
    params = [mixer.conv1d.weight, mixer.conv1d.bias, mixer.A_log, mixer.D, mixer.dt_bias]

    TorchOps.calls.clear()
    y_ref, ref = _conv_scan_grads(mixer, zxbcdt, seq, w, params)
    assert "scan_fwd_state" not in TorchOps.calls, "rows within the limit take the single-call path"
    _, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    cost = longseq.token_cost(xbc, dt, (8, 16, 2, mixer.ssm_state_size), 8)
    lower_limit(monkeypatch, cost, 3)
    assert longseq.spans(T, cost, 8, 3) == [(0, 16), (16, 32), (32, 48), (48, T)]
    y, got = _conv_scan_grads(mixer, zxbcdt, seq, w, params)
    assert TorchOps.calls["scan_fwd_state"] == 4 * rows

    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    for name, a, b in zip(["zxbcdt", "conv.weight", "conv.bias", "A_log", "D", "dt_bias"], got, ref):
        # conv_scan takes A = -exp(A_log) in float32 whatever the model's dtype: its gradient is a float32 sum,
        # here of four pieces
        rtol = 1e-6 if name == "A_log" else 0
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
        assert b.abs().max() > 0, name


@pytest.mark.parametrize("lengths", [[T], [16, 15, 2, 13, 1, 6]])
def test_piecewise_scan_equals_one_scan(monkeypatch: pytest.MonkeyPatch, lengths: list[int]) -> None:
    """`piecewise_scan` (long rows of the kernels backend without causal-conv1d), the torch scan standing in for
    mamba-ssm's."""
    torch.manual_seed(2)
    h, p, n = 8, 4, 6
    x, dt, B, C = (torch.randn(*shape, dtype=torch.float64, requires_grad=True)
                   for shape in ((1, T, h, p), (1, T, h), (1, T, 2, n), (1, T, 2, n)))
    A_log, D, dt_bias = (torch.randn(h, dtype=torch.float64, requires_grad=True) for _ in range(3))
    seq = ids_of(lengths) if len(lengths) > 1 else None
    w = torch.randn(1, T, h, p, dtype=torch.float64)
    leaves = [x, dt, B, C, A_log, D, dt_bias]

    def scan(x, dt, B, C, seq_idx, initial_states):  # noqa: ANN001, ANN202
        return ssd_scan_torch(x, dt, -torch.exp(A_log), B, C, 8, D=D, dt_bias=dt_bias, seq_idx=seq_idx,
                              initial_states=initial_states, return_final_states=True)

    whole = scan(x, dt, B, C, seq, None)[0]
    g_whole = torch.autograd.grad((whole * w).sum(), leaves)
    cost = longseq.scan_cost(x, dt, B, C, 8)
    lower_limit(monkeypatch, cost, 0)
    assert longseq.spans(T, cost, 8, 0) == [(0, 16), (16, 32), (32, 48), (48, T)]
    pieces = longseq.piecewise_scan(scan, x, dt, B, C, seq, 8)
    g_pieces = torch.autograd.grad((pieces * w).sum(), leaves)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-10)
    for a, b in zip(g_pieces, g_whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        assert b.abs().max() > 0


def test_by_rows_splits_long_inputs_and_keeps_values_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    wide = torch.randn(2, 37, 24, dtype=torch.float64, requires_grad=True)
    x, gate = wide[..., :8], wide[..., 8:16]  # gate: a slice with row stride 24, like the norm's gate
    calls = []

    def fn(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        calls.append(a.shape[0] if a.dim() == 2 else -1)
        return a * torch.sigmoid(z) / a.pow(2).mean(-1, keepdim=True).add(1).sqrt()

    ref = fn(x, gate)
    g_ref = torch.autograd.grad(ref.pow(2).sum(), wide)[0]
    calls.clear()
    monkeypatch.setattr(longseq, "OFFSET_LIMIT", 24 * 10 + 1)  # 10 rows per call
    out = longseq.by_rows(fn, x, gate)
    assert calls == [10] * 7 + [4]
    g = torch.autograd.grad(out.pow(2).sum(), wide)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-12)
