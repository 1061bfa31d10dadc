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
import os
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
    from mamba_ssm.ops.triton import ssd_combined

    if all(hasattr(ssd_combined, name) for name in _SSD_PIECES):  # the pieces those two halves are made of
        kernels["ssd"] = ssd_combined
    keep_autotuning(autotuners(("mamba_ssm.",)))
    return kernels


def autotuners(prefixes: tuple[str, ...]) -> list:
    """The Triton autotuners defined at module level in the imported modules under `prefixes`."""
    from triton.runtime.autotuner import Autotuner

    found = {}
    for name, module in list(sys.modules.items()):
        if name.startswith(prefixes) and module is not None:
            for value in vars(module).values():
                if isinstance(value, Autotuner):
                    found[id(value)] = value
    return list(found.values())


def keep_autotuning(tuners: list) -> int:
    """Have `tuners` keep their results in Triton's cache on disk (its `TRITON_CACHE_AUTOTUNING`, for these
    kernels only); returns how many were switched on.

    mamba-ssm's SSD kernels autotune over 183 configurations in 25 autotuners the first time a process runs them.
    Triton keeps the compiled kernels on disk, but without this every later process benchmarks them all again.
    Triton leaves out the autotuners whose configurations carry a pre-hook (it cannot store those); they still
    benchmark. `TRITON_CACHE_AUTOTUNING=0` in the environment keeps Triton's default (benchmark every process);
    Triton before 3.4 has no such cache.
    """
    if os.environ.get("TRITON_CACHE_AUTOTUNING") == "0":
        return 0
    switched = [t for t in tuners if hasattr(t, "check_disk_cache") and not getattr(t, "cache_results", True)]
    for tuner in switched:
        tuner.cache_results = True
    return len(switched)


_SSD_PIECES = ("_chunk_cumsum_fwd", "_chunk_state_fwd", "_state_passing_fwd", "_bmm_chunk_fwd", "_chunk_scan_fwd",
               "_chunk_scan_bwd_dstates", "_state_passing_bwd", "_chunk_scan_chunk_state_bwd_dx", "_chunk_state_bwd_db",
               "_chunk_scan_bwd_dC", "_chunk_scan_bwd_dcb", "_bmm_chunk_bwd", "_chunk_scan_bwd_ddAcs_stable",
               "_chunk_cumsum_bwd")


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
    def can_keep() -> bool:
        """Whether `scan_fwd_keep` and `scan_bwd_kept` can run (mamba-ssm exposes the pieces of its scan)."""
        return "ssd" in mamba_ssm_kernels()

    @staticmethod
    def scan_fwd_keep(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit):  # noqa: ANN001, ANN205
        """`scan_fwd` from mamba-ssm's pieces; returns (out, kept), kept = (softplus(dt + bias) per chunk, its
        cumulative dA, every chunk's incoming state in float32, C·B per chunk): what mamba-ssm's backward would
        recompute with the same kernels from the same inputs. The output is the same: the scan reads the states
        rounded to the input dtype either way."""
        k = mamba_ssm_kernels()["ssd"]
        B, C = (t if t.stride(-1) == 1 else t.contiguous() for t in (B, C))
        x = x if x.stride(-1) == 1 or x.stride(1) == 1 else x.contiguous()
        dA_cs, dt_s = k._chunk_cumsum_fwd(dt, A, chunk_size, dt_bias=dt_bias, dt_softplus=True, dt_limit=dt_limit)
        states = k._chunk_state_fwd(B, x, dt_s, dA_cs, seq_idx=seq_idx, states_in_fp32=True)
        states, _ = k._state_passing_fwd(states.flatten(-2), dA_cs[:, :, :, -1], seq_idx=seq_idx, chunk_size=chunk_size)
        states = states.unflatten(-1, (x.shape[-1], B.shape[-1]))
        CB = k._bmm_chunk_fwd(C, B, chunk_size, seq_idx=seq_idx, output_dtype=torch.float32)
        out, _ = k._chunk_scan_fwd(CB, x, dt_s, dA_cs, C, states, D=D, z=None, seq_idx=seq_idx)
        return out, (dt_s, dA_cs, states, CB)

    @staticmethod
    def scan_bwd_kept(dout, x, dt, A, B, C, kept, chunk_size, D, dt_bias, seq_idx, dt_limit, dx, ddt, dB, dC):  # noqa: ANN001, ANN205
        """`scan_bwd` from what `scan_fwd_keep` kept: mamba-ssm's backward, the same kernels in the same order,
        without recomputing the forward's states. Returns (dx, ddt, dA, dB, dC, dD, ddt_bias)."""
        k = mamba_ssm_kernels()["ssd"]
        dt_s, dA_cs, states, CB = kept
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dstates = k._chunk_scan_bwd_dstates(C, dA_cs, dout, seq_idx=seq_idx, dtype=states.dtype)
        dstates, ddA_chunk, _, states = k._state_passing_bwd(
            states.flatten(-2), dA_cs[:, :, :, -1], dstates.flatten(-2), seq_idx=seq_idx, has_initial_states=False,
            dstates_dtype=x.dtype, states_dtype=x.dtype, chunk_size=chunk_size)
        states, dstates = (t.unflatten(-1, (x.shape[-1], B.shape[-1])) for t in (states, dstates))
        dx, ddt_s, dD = k._chunk_scan_chunk_state_bwd_dx(x, dt_s, dA_cs, B, CB, dout, dstates, D=D, seq_idx=seq_idx,
                                                         dx=dx)
        groups = B.shape[2]
        dB_part, ddA_next = k._chunk_state_bwd_db(x, dt_s, dA_cs, dstates, seq_idx=seq_idx, B=B, ngroups=groups)
        dC_part, ddA_prev = k._chunk_scan_bwd_dC(states.to(x.dtype), dA_cs, dout, seq_idx=seq_idx, C=C, ngroups=groups)
        dCB = k._chunk_scan_bwd_dcb(x, dt_s, dA_cs, dout, seq_idx=seq_idx, ngroups=groups).to(CB.dtype)
        k._bmm_chunk_bwd(C, dCB, residual=dB_part, out=dB)
        k._bmm_chunk_bwd(B, dCB.transpose(-1, -2), residual=dC_part, out=dC)
        ddA_prev[..., -1] += ddA_chunk
        ddA = k._chunk_scan_bwd_ddAcs_stable(x, dt_s, dA_cs, dout, CB)
        ddA += ddA_next + ddA_prev.flip([-1]).cumsum(dim=-1).flip([-1])
        ddt, dA, ddt_bias = k._chunk_cumsum_bwd(ddA, ddt_s, dt, A, dt_bias=dt_bias, dt_softplus=True,
                                                dt_limit=dt_limit, ddt=ddt)
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


def conv_scan_forward_kernels(ops, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, shape, chunk_size, dt_limit,  # noqa: ANN001, ANN201
                              keep=False):
    """The conv+scan forward as kernel calls: (scan(silu(conv(xbc))) as (b, t, heads, head_dim), kept). kept is
    empty, or with `keep` (ops that `can_keep`) what the scan's backward would recompute
    (`KernelOps.scan_fwd_keep`)."""
    x, B, C = split_xbc(ops.conv_fwd(channel_last(xbc), weight, bias, seq_idx).transpose(1, 2), shape)
    if keep:
        return ops.scan_fwd_keep(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit)
    return ops.scan_fwd(x, dt, A, B, C, chunk_size, D, dt_bias, seq_idx, dt_limit), ()


def conv_scan_backward_kernels(ops, dout, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, shape, chunk_size, dt_limit,  # noqa: ANN001, ANN202
                               dxbc=None, ddt=None, kept=()):
    """(dxbc, ddt, dweight, dbias, dA, dD, ddt_bias); the conv output is recomputed from its input. `dxbc` and
    `ddt`, when given (dense, shaped as `xbc` and `dt`), receive those gradients in place. `kept`: what
    `conv_scan_forward_kernels(keep=True)` returned beside the output (the scan then recomputes nothing)."""
    x_cl = channel_last(xbc)
    x, B, C = split_xbc(ops.conv_fwd(x_cl, weight, bias, seq_idx).transpose(1, 2), shape)
    dconv = torch.empty(xbc.shape, dtype=xbc.dtype, device=xbc.device)  # dense: its transpose is channel-last
    dx, dB, dC = split_xbc(dconv, shape)
    ddt = torch.empty(dt.shape, dtype=dt.dtype, device=dt.device) if ddt is None else ddt
    # mamba-ssm's backward reads the forward output only to go through a gate (z); this scan has none, so x
    # stands in for it and the output need not be kept.
    if kept:
        got = ops.scan_bwd_kept(dout, x, dt, A, B, C, kept, chunk_size, D, dt_bias, seq_idx, dt_limit, dx, ddt, dB, dC)
    else:
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
    """Makes the conv+scan's kernel calls one by one (`ConvScanGraphs` in bamba_ft.ops.graphs replays them).

    `forward(...)` -> (scan output, kept tensors); `backward(dout, ..., kept)` -> input gradients. With `keep`
    (and ops that `can_keep`) the scan's forward keeps its chunk states for backward: about 19 KB per token and
    Mamba-2 layer at the Bamba-9B shape, for a backward without mamba-ssm's recomputation.
    """

    def __init__(self, ops: type = KernelOps, keep: bool = False) -> None:
        self.ops = ops
        self.keep = keep and getattr(ops, "can_keep", lambda: False)()

    def forward(self, *args):  # noqa: ANN002, ANN201
        return conv_scan_forward_kernels(self.ops, *args, keep=self.keep)

    def backward(self, *args, kept=()):  # noqa: ANN002, ANN001, ANN201
        return conv_scan_backward_kernels(self.ops, *args, kept=kept)
