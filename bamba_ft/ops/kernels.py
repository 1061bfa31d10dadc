"""The optional CUDA kernels of the Mamba-2 mixer: loading them, the backend they allow, and their calls.

mamba-ssm's Triton SSD scan and gated RMSNorm, and causal-conv1d's conv, each with `seq_idx`. Every loader
returns None or {} when its package is missing or unusable, so importing this module never needs CUDA.
`KernelOps` gathers the four calls of the fused conv+scan; `conv_scan_forward_kernels` and
`conv_scan_backward_kernels` chain them (run directly by `DirectConvScan`, replayed by bamba_ft.ops.graphs).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
import types

import torch

from bamba_ft.config.schema import Mixer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# Loading


def _import_triton_kernels() -> dict[str, object]:
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    kernels = {"scan": mamba_chunk_scan_combined, "rmsnorm": rmsnorm_fn}
    try:  # the scan's forward and backward halves (what mamba-ssm's own fused conv+scan calls)
        from mamba_ssm.ops.triton.ssd_combined import (
            _mamba_chunk_scan_combined_bwd,
            _mamba_chunk_scan_combined_fwd,
        )

        kernels.update(scan_fwd=_mamba_chunk_scan_combined_fwd, scan_bwd=_mamba_chunk_scan_combined_bwd)
    except ImportError:
        pass
    return kernels


@functools.cache
def mamba_ssm_kernels() -> dict[str, object]:
    """mamba-ssm's Triton scan and gated RMSNorm, or {} when the package is not importable.

    The kernels used here are Triton (compiled at run time); only the package's `__init__` needs its compiled
    `selective_scan_cuda` extension. A mamba-ssm installed without that extension
    (MAMBA_SKIP_CUDA_BUILD=TRUE, no compiler needed) is still used: its kernel modules are imported under a
    temporary package object that skips the `__init__`.
    """
    try:
        return _import_triton_kernels()
    except ImportError as e:
        if "selective_scan_cuda" not in str(e) or importlib.util.find_spec("mamba_ssm") is None:
            return {}
    except Exception:  # e.g. Triton without a GPU driver
        return {}
    spec = importlib.util.find_spec("mamba_ssm")
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations or [])
    sys.modules["mamba_ssm"] = package
    try:
        return _import_triton_kernels()
    except Exception:
        return {}
    finally:
        sys.modules.pop("mamba_ssm", None)  # later `import mamba_ssm` behaves as without bamba_ft


@functools.cache
def causal_conv1d_kernel() -> object | None:
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


@functools.cache
def causal_conv1d_halves() -> tuple[object, object] | None:
    """causal-conv1d's forward and backward functions (1.7: `cpp_functions`; older: the extension module)."""
    try:
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function

        return causal_conv1d_fwd_function, causal_conv1d_bwd_function
    except Exception:
        pass
    try:
        import causal_conv1d_cuda

        return causal_conv1d_cuda.causal_conv1d_fwd, causal_conv1d_cuda.causal_conv1d_bwd
    except Exception:
        return None


def available_backend(device: torch.device | str) -> Mixer:
    """The fastest exact mixer backend on `device`: kernels on CUDA where mamba-ssm imports, else torch.

    kernels without causal-conv1d runs the conv in torch (`report_backend` warns once).
    """
    if torch.device(device).type != "cuda" or not mamba_ssm_kernels():
        return Mixer.TORCH
    return Mixer.KERNELS


_reported: set[Mixer] = set()


def report_backend(backend: Mixer) -> None:
    """Log the backend a mixer runs, once per backend, under its `model.mixer` name."""
    if backend in _reported:
        return
    _reported.add(backend)
    log.info("mixer backend: %s", backend.value)
    if backend == Mixer.KERNELS and causal_conv1d_kernel() is None:
        log.warning(
            "causal_conv1d is not installed: the mixer's conv runs in PyTorch (exact, slower). "
            "Install `causal-conv1d` for the fused kernel."
        )


# ----------------------------------------------------------------------------------------------------------
# Kernel calls of the fused conv+scan


class KernelOps:
    """The four CUDA kernel calls of the fused conv+scan (causal-conv1d, mamba-ssm's SSD scan), in one place.

    Layouts: conv tensors are (batch, channels, tokens) views of channel-last (batch, tokens, channels) memory.
    The backward functions write their input gradients into the buffers they are given.
    """

    @staticmethod
    def available() -> bool:
        return causal_conv1d_halves() is not None and "scan_bwd" in mamba_ssm_kernels()

    @staticmethod
    def conv_fwd(x, weight, bias, seq_idx):  # noqa: ANN001, ANN205
        return causal_conv1d_halves()[0](x, weight, bias, seq_idx, None, None, True)

    @staticmethod
    def conv_bwd(x, weight, bias, dout, seq_idx, dx):  # noqa: ANN001, ANN205
        dx, dweight, dbias, _ = causal_conv1d_halves()[1](x, weight, bias, dout, seq_idx, None, None, dx, False, True)
        return dx, dweight, dbias

    @staticmethod
    def scan_fwd(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit):  # noqa: ANN001, ANN205
        return mamba_ssm_kernels()["scan_fwd"](x, dt, A, B, C, chunk_size, D=D, z=None, dt_bias=dt_bias, seq_idx=seq_idx,
                                        dt_softplus=True, dt_limit=dt_limit)[0]

    @staticmethod
    def scan_bwd(dout, x, dt, A, B, C, out, chunk_size, D, dt_bias, seq_idx, dt_limit, dx, ddt, dB, dC):  # noqa: ANN001, ANN205
        dx, ddt, dA, dB, dC, dD, _, ddt_bias, _ = mamba_ssm_kernels()["scan_bwd"](
            dout, x, dt, A, B, C, out, chunk_size, D=D, z=None, dt_bias=dt_bias, seq_idx=seq_idx, dt_softplus=True,
            dt_limit=dt_limit, dx=dx, ddt=ddt, dB=dB, dC=dC)
        return dx, ddt, dA, dB, dC, dD, ddt_bias

    @staticmethod
    def scan_fwd_state(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit, initial_states):  # noqa: ANN001, ANN205
        """`scan_fwd` starting from `initial_states` (or zeros); returns (out, final states in float32)."""
        got = mamba_ssm_kernels()["scan_fwd"](x, dt, A, B, C, chunk_size, D=D, z=None, dt_bias=dt_bias,
                                       initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True,
                                       dt_limit=dt_limit)
        return got[0], got[5]

    @staticmethod
    def scan_bwd_state(dout, x, dt, A, B, C, out, chunk_size, D, dt_bias, seq_idx, dt_limit, dx, ddt, dB, dC,  # noqa: ANN001, ANN205
                       initial_states, dfinal_states):
        """`scan_bwd` with initial and final states; returns (dx, ddt, dA, dB, dC, dD, ddt_bias, dinitial_states)."""
        got = mamba_ssm_kernels()["scan_bwd"](
            dout, x, dt, A, B, C, out, chunk_size, D=D, z=None, dt_bias=dt_bias, initial_states=initial_states,
            dfinal_states=dfinal_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit, dx=dx, ddt=ddt,
            dB=dB, dC=dC)
        return got[0], got[1], got[2], got[3], got[4], got[5], got[7], got[8]


def channel_last(xbc: torch.Tensor) -> torch.Tensor:
    """(b, t, c) -> (b, c, t) channel-last view; causal-conv1d needs the token stride to be a multiple of 8."""
    return (xbc if xbc.stride(1) % 8 == 0 else xbc.contiguous()).transpose(1, 2)


def split_xbc(xbc: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, ...]:
    heads, head_dim, groups, state = shape
    b, t, _ = xbc.shape
    x, B, C = xbc.split([heads * head_dim, groups * state, groups * state], dim=-1)
    return x.reshape(b, t, heads, head_dim), B.reshape(b, t, groups, state), C.reshape(b, t, groups, state)


def conv_scan_forward_kernels(ops, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, shape, chunk_size, dt_limit):  # noqa: ANN001, ANN201
    """The conv+scan forward as kernel calls: scan(silu(conv(xbc))), (b, t, heads, head_dim)."""
    x, B, C = split_xbc(ops.conv_fwd(channel_last(xbc), weight, bias, seq_idx).transpose(1, 2), shape)
    return ops.scan_fwd(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit)


def conv_scan_backward_kernels(ops, dout, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, shape, chunk_size, dt_limit,  # noqa: ANN001, ANN202
                               dxbc=None, ddt=None):
    """(dxbc, ddt, dweight, dbias, dA, dD, ddt_bias); the conv output is recomputed from its input. `dxbc` and
    `ddt`, when given (dense, shaped as `xbc` and `dt`), receive those gradients in place."""
    x_cl = channel_last(xbc)
    x, B, C = split_xbc(ops.conv_fwd(x_cl, weight, bias, seq_idx).transpose(1, 2), shape)
    dconv = torch.empty(xbc.shape, dtype=xbc.dtype, device=xbc.device)  # dense: its transpose is channel-last
    dx, dB, dC = split_xbc(dconv, shape)
    ddt = torch.empty(dt.shape, dtype=dt.dtype, device=dt.device) if ddt is None else ddt
    # mamba-ssm's backward reads the forward output only to go through a gate (z); this scan has none, so x
    # stands in for it and the output need not be kept.
    got = ops.scan_bwd(dout, x, dt, A, B, C, x, chunk_size, D, dt_bias, seq_idx, dt_limit, dx, ddt, dB, dC)
    for buf, value in zip((dx, ddt, dB, dC), (got[0], got[1], got[3], got[4])):
        if value.data_ptr() != buf.data_ptr():
            buf.copy_(value)
    dxbc = torch.empty(xbc.shape, dtype=xbc.dtype, device=xbc.device) if dxbc is None else dxbc
    dxbc_cl, dweight, dbias = ops.conv_bwd(x_cl, weight, bias, dconv.transpose(1, 2), seq_idx, dxbc.transpose(1, 2))
    if dxbc_cl.data_ptr() != dxbc.data_ptr():
        dxbc.copy_(dxbc_cl.transpose(1, 2))
    return dxbc, ddt, dweight, dbias, got[2], got[5], got[6]


class DirectConvScan:
    """Makes the conv+scan's kernel calls one by one (`ConvScanGraphs` in bamba_ft.ops.graphs replays them)."""

    def __init__(self, ops: type = KernelOps) -> None:
        self.ops = ops

    def forward(self, *args):  # noqa: ANN002, ANN201
        return conv_scan_forward_kernels(self.ops, *args)

    def backward(self, *args):  # noqa: ANN002, ANN201
        return conv_scan_backward_kernels(self.ops, *args)
