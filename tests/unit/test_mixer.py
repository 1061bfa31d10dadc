"""The exact torch mixer: SSD scan and conv against step-by-step references, and against transformers' mixer."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from bamba_ft.config.schema import CHOICES, Mixer
from bamba_ft.errors import ConfigError
from bamba_ft.model.mixer import install_mixer
from bamba_ft.ops import kernels
from bamba_ft.ops.kernels import available_backend
from bamba_ft.ops.mamba2 import (
    mixer_forward,
    seq_idx_from_attention_mask,
    seq_idx_from_cu_seqlens,
    seq_idx_from_position_ids,
    unfused_conv_scan,
)
from bamba_ft.ops.scan_ref import segment_conv1d, ssd_scan_torch
from tests.conftest import make_model


def recurrence(x, dt, A, B, C, D, dt_bias, seq_idx=None):  # noqa: ANN001, ANN201
    """Mamba-2 as its definition: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t h_t + D x_t; reset per sequence."""
    b, t, h, p = x.shape
    g = B.shape[2]
    dt = F.softplus(dt + dt_bias)
    Bh, Ch = B.repeat_interleave(h // g, 2), C.repeat_interleave(h // g, 2)
    state = torch.zeros(b, h, p, B.shape[-1], dtype=x.dtype)
    ys = []
    for i in range(t):
        if seq_idx is not None and i > 0:
            keep = (seq_idx[:, i] == seq_idx[:, i - 1]).to(x.dtype)[:, None, None, None]
            state = state * keep
        decay = torch.exp(dt[:, i] * A)[:, :, None, None]
        state = state * decay + dt[:, i, :, None, None] * x[:, i, :, :, None] * Bh[:, i, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, i]) + D[:, None] * x[:, i])
    return torch.stack(ys, 1)


def conv_reference(x, w, bias, seq_idx):  # noqa: ANN001, ANN201
    b, t, c = x.shape
    k = w.shape[1]
    out = torch.zeros_like(x) + bias
    for bi in range(b):
        for i in range(t):
            for j in range(k):
                src = i - (k - 1) + j
                if src >= 0 and (seq_idx is None or seq_idx[bi, src] == seq_idx[bi, i]):
                    out[bi, i] += w[:, j] * x[bi, src]
    return out


def segments(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


@pytest.mark.parametrize("chunk", [4, 8, 16])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize(
    "lengths",
    [
        [37],  # one sequence, ragged last chunk
        [8, 8, 16, 5],  # boundaries on chunk edges (for chunk 4 and 8)
        [3, 1, 11, 1, 1, 20],  # mid-chunk boundaries and length-1 sequences
    ],
)
def test_ssd_scan_matches_recurrence_float64(chunk: int, groups: int, lengths: list[int]) -> None:
    torch.manual_seed(chunk * 10 + groups)
    t, h, p, n = sum(lengths), 4, 3, 5
    dd = dict(dtype=torch.float64)
    x, dt = torch.randn(1, t, h, p, **dd), torch.randn(1, t, h, **dd)
    A, D, dt_bias = -torch.rand(h, **dd) * 2, torch.randn(h, **dd), torch.randn(h, **dd)
    B, C = torch.randn(1, t, groups, n, **dd), torch.randn(1, t, groups, n, **dd)
    seq = segments(lengths) if len(lengths) > 1 else None
    y = ssd_scan_torch(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, seq_idx=seq)
    torch.testing.assert_close(y, recurrence(x, dt, A, B, C, D, dt_bias, seq), rtol=0, atol=1e-10)


def test_ssd_scan_batch_rows_are_independent() -> None:
    torch.manual_seed(1)
    b, t, h, p, n = 3, 19, 2, 4, 3
    dd = dict(dtype=torch.float64)
    args = (torch.randn(b, t, h, p, **dd), torch.randn(b, t, h, **dd), -torch.rand(h, **dd), torch.randn(b, t, 1, n, **dd),
            torch.randn(b, t, 1, n, **dd))
    D, dt_bias = torch.randn(h, **dd), torch.randn(h, **dd)
    seq = torch.stack([segments([19])[0], segments([5, 14])[0], segments([1, 9, 9])[0]])
    y = ssd_scan_torch(*args, 8, D=D, dt_bias=dt_bias, seq_idx=seq)
    torch.testing.assert_close(y, recurrence(*args, D, dt_bias, seq), rtol=0, atol=1e-10)


@pytest.mark.parametrize("lengths", [[12], [4, 1, 7], [1, 1, 1, 9]])
def test_segment_conv1d_matches_reference(lengths: list[int]) -> None:
    torch.manual_seed(2)
    t = sum(lengths)
    x, w, bias = torch.randn(1, t, 6, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    seq = segments(lengths)
    torch.testing.assert_close(segment_conv1d(x, w, bias, seq), conv_reference(x, w, bias, seq), rtol=0, atol=1e-12)


def test_seq_idx_derivations_agree() -> None:
    lengths = [3, 1, 5]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    expected = segments(lengths).to(torch.int32)
    assert torch.equal(seq_idx_from_position_ids(pos), expected)
    assert torch.equal(seq_idx_from_cu_seqlens(cu, 9), expected)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert seq_idx_from_attention_mask(mask).tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_mixer_matches_transformers_single_sequence() -> None:
    """transformers' torch mixer computes its scan in float32 even for float64 models, hence rtol 1e-5."""
    model = make_model(torch.float64, mamba_chunk_size=8)
    mixer = model.model.layers[0].mamba
    h = torch.randn(2, 29, model.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        ours = mixer_forward(mixer, h, backend="torch")
        theirs = mixer(h)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_mixer_padded_rows_equal_unpadded() -> None:
    """Left and right padding (attention mask) leave the real tokens' outputs as without padding."""
    model = make_model(torch.float64, mamba_chunk_size=4)
    mixer = model.model.layers[0].mamba
    d = model.config.hidden_size
    a, b = torch.randn(1, 9, d, dtype=torch.float64), torch.randn(1, 6, d, dtype=torch.float64)
    pad = torch.randn(1, 3, d, dtype=torch.float64)  # padding with non-zero content must not matter
    with torch.no_grad():
        ref_a, ref_b = mixer_forward(mixer, a, backend="torch"), mixer_forward(mixer, b, backend="torch")
        right = torch.cat([a, torch.cat([b, pad], 1)])
        out_r = mixer_forward(mixer, right, attention_mask=torch.tensor([[1] * 9, [1] * 6 + [0] * 3]), backend="torch")
        left = torch.cat([a, torch.cat([pad, b], 1)])
        out_l = mixer_forward(mixer, left, attention_mask=torch.tensor([[1] * 9, [0] * 3 + [1] * 6]), backend="torch")
    torch.testing.assert_close(out_r[0], ref_a[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out_r[1, :6], ref_b[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out_l[1, 3:], ref_b[0], rtol=0, atol=1e-10)


def test_mixer_backend_is_logged_and_chosen_by_its_config_name(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """auto resolves to torch on the CPU, logged as `mixer backend: torch`; a name outside the backends is refused
    with the valid ones, where a fall-through would quietly have run the torch path."""
    monkeypatch.setattr(kernels, "_reported", set())
    mixer = make_model(torch.float32).model.layers[0].mamba
    h = torch.randn(1, 5, mixer.hidden_size)
    assert available_backend("cpu") is Mixer.TORCH
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        auto = mixer_forward(mixer, h, backend="auto")
    assert "mixer backend: torch" in caplog.messages
    torch.testing.assert_close(auto, mixer_forward(mixer, h, backend=Mixer.TORCH), rtol=0, atol=0)
    for bad in ("cuda-kernels", "hf"):
        with pytest.raises(ConfigError, match=rf"backend='{bad}' is not an option\..* Valid: auto, kernels, torch"):
            mixer_forward(mixer, h, backend=bad)
    with pytest.raises(ConfigError, match=r"backend='triton' is not an option\..* Valid: kernels, torch"):
        unfused_conv_scan(mixer, h.new_zeros(1, 5, mixer.conv_dim), h.new_zeros(1, 5, mixer.num_heads), None, "triton")


def test_install_mixer_refuses_an_unknown_choice_naming_every_model_mixer_value() -> None:
    model = make_model(torch.float32)
    valid = ", ".join(CHOICES["model.mixer"])
    assert valid == "auto, kernels, torch, hf"
    with pytest.raises(ConfigError, match=rf"model.mixer='kernel' is not an option\. Did you mean 'kernels'\? "
                                          rf"Valid: {valid}"):
        install_mixer(model, "kernel")
    assert install_mixer(model, "torch") == "torch" == Mixer.TORCH


def test_on_mixers_sets_attributes_in_the_block_and_restores_them() -> None:
    """What the bench's per-measurement switches rely on: a value the mixers had comes back, one they did not
    have is removed again, also when the block raises."""
    from bamba_ft.config.schema import ScanStates
    from bamba_ft.model.mixer import on_mixers, scan_states

    model = make_model(torch.float32)
    install_mixer(model, "torch", scan_states="recompute")
    mixers = [m for m in model.modules() if hasattr(m, "keeps_scan_states")]
    assert mixers
    with pytest.raises(RuntimeError, match="inside"), on_mixers(model, scan_states=ScanStates.KEEP, conv_scan_ops=int):
        assert all(m.scan_states == ScanStates.KEEP and m.conv_scan_ops is int for m in mixers)
        raise RuntimeError("inside")
    assert all(m.scan_states == ScanStates.RECOMPUTE and "conv_scan_ops" not in m.__dict__ for m in mixers)
    with scan_states(model, "keep"):
        assert all(m.keeps_scan_states() for m in mixers)
    with scan_states(model, None):
        assert not any(m.keeps_scan_states() for m in mixers)


def test_cuda_graphs_auto_pays_only_for_a_float8_base_on_packed_short_rows_on_one_gpu() -> None:
    from bamba_ft.model.mixer import GRAPHS_AUTO_MAX_TOKENS, why_no_graphs

    gpu = torch.device("cuda")  # a device object only: nothing runs on it
    good = dict(device=gpu, packing=True, longest=8192, checkpointing="none", offload=False, processes=1, quant="fp8")
    assert why_no_graphs(**good) is None
    assert why_no_graphs(**good | {"longest": GRAPHS_AUTO_MAX_TOKENS}) is None
    for change, reason in [({"quant": "none"}, "quant.method=none: the step waits on the GPU"),
                           ({"quant": "nf4"}, "quant.method=nf4"),
                           ({"device": torch.device("cpu"), "quant": "none"}, "not a CUDA device (cpu)"),
                           ({"packing": False}, "data.packing=false"),
                           ({"longest": GRAPHS_AUTO_MAX_TOKENS + 1}, f"data.max_tokens_per_batch={GRAPHS_AUTO_MAX_TOKENS + 1}"),
                           ({"checkpointing": "mamba"}, "model.gradient_checkpointing=mamba"),
                           ({"offload": True}, "model.activation_offload=true"),
                           ({"processes": 2}, "2 processes")]:
        assert why_no_graphs(**good | change).startswith(reason), change


def test_cuda_graphs_auto_installs_none_where_the_fused_conv_scan_does_not_run() -> None:
    """On the CPU (torch backend) auto means off, without the error true gives; false installs none either."""
    from bamba_ft.model.mixer import graphs_installed, install_mixer

    for setting in ("auto", "false", False):
        model = make_model(torch.float32)
        install_mixer(model, "auto", cuda_graphs=setting, device=torch.device("cpu"))
        assert not graphs_installed(model), setting
    with pytest.raises(ConfigError, match="model.cuda_graphs='sometimes' is not an option"):
        install_mixer(make_model(torch.float32), "auto", cuda_graphs="sometimes")


@pytest.mark.parametrize("devices,nodes,expected", [(1, 1, 1), (4, 1, 4), ([2], 1, 1), ([0, 1], 2, 4), ("2", 1, 2)])
def test_training_counts_its_processes_for_the_graphs_decision(devices: object, nodes: int, expected: int) -> None:
    from bamba_ft.config.schema import TrainerConfig
    from bamba_ft.jobs.train import _processes

    assert _processes(TrainerConfig(devices=devices, num_nodes=nodes)) == expected
