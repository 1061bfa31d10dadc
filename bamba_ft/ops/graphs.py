"""The fused conv+scan's kernel launches replayed as CUDA graphs, one graph per length bucket and direction.

Why: the conv+scan launches about 20 kernels per layer and direction through mamba-ssm's Python glue and
Triton's launcher, which costs the CPU about twice what the kernels cost the GPU (BENCHMARKS.md, host cost
per call). Replaying a captured graph costs one launch.

How: every mixer of a model with the same dimensions shares one `ConvScanGraphs`. Its static buffers hold
one layer's inputs and outputs at a time; a call copies its tensors in, replays the graph of its length bucket
(token count rounded up to `bucket`) and returns copies of the outputs. The backward kernels write their input
gradients straight into the static buffers; the scan's forward allocates its output, which the graph copies
into its buffer. The padded tail of a bucket is a sequence of its own (`seq_idx` = last + 1)
with zero inputs and zero output gradient, so it changes nothing the real tokens see or receive. Graphs of all
buckets share one memory pool (they never run at the same time). When a longer input arrives than the buffers
hold, the buffers grow (x1.25) and the graphs are captured again, lazily; `prepare` captures every bucket up to
a known longest row before training, so that no step pays for a capture.

`capture=False` runs the same bookkeeping with the kernel calls made directly instead of replayed (used to
test it on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bamba_ft.ops.kernels import KernelOps, conv_scan_backward_kernels, conv_scan_forward_kernels

Shape = tuple[int, int, int, int]  # heads, head_dim, groups, state
PARAMS = ("weight", "bias", "A", "D", "dt_bias")  # the conv+scan's parameters, in the kernels' order


Outputs = tuple[torch.Tensor | None, ...]


class _Direct:
    """Stand-in for a captured graph when capture is off: replay() runs the body and returns what it returned."""

    def __init__(self, body: Callable[[], Outputs]) -> None:
        self.replay = body


class _Captured:
    """A CUDA graph and its output tensors (static buffers, or small ones its capture allocated in the pool, which
    stay reserved for it): replay() rewrites them."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: Outputs) -> None:
        self.graph, self.outputs = graph, outputs

    def replay(self) -> Outputs:
        self.graph.replay()
        return self.outputs


class _Family:
    """Static buffers and graphs for one set of dimensions and dtypes, `capacity` tokens per row."""

    def __init__(self, like: dict[str, torch.Tensor | None], rows: int, capacity: int, shape: Shape,
                 chunk_size: int, dt_limit: tuple, capture: bool) -> None:
        self.rows, self.capacity, self.shape, self.chunk_size, self.dt_limit = rows, capacity, shape, chunk_size, dt_limit
        heads, head_dim, _, _ = shape
        xbc, dt = like["xbc"], like["dt"]
        # activation buffers: (per-token shape, dtype); flat, so that every bucket's view is contiguous
        layout = {"xbc": ((xbc.shape[-1],), xbc.dtype), "dt": ((heads,), dt.dtype), "seq": ((), torch.int32),
                  "y": ((heads, head_dim), xbc.dtype)}
        layout |= {"dout": layout["y"], "dxbc": layout["xbc"], "ddt": layout["dt"]}
        self.inner = {name: inner for name, (inner, _) in layout.items()}
        self.flat = {name: torch.zeros(rows * capacity * math.prod(inner), dtype=dtype, device=xbc.device)
                     for name, (inner, dtype) in layout.items()}
        # parameters (whole tensors, the same for every bucket)
        self.params = {k: (torch.zeros_like(v) if v is not None else None) for k, v in like.items()
                       if k not in ("xbc", "dt")}
        self.graphs: dict[tuple[str, int], _Direct | _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def view(self, name: str, length: int) -> torch.Tensor:
        """(rows, length, ...) contiguous view of a static buffer."""
        inner = self.inner[name]
        return self.flat[name][: self.rows * length * math.prod(inner)].view(self.rows, length, *inner)


class ConvScanGraphs:
    """Runs `conv_scan`'s forward and backward kernels as CUDA graphs (see the module docstring).

    Same interface as `DirectConvScan`: `forward(...)` -> (scan output, ()), `backward(dout, ...)` -> input gradients.
    """

    def __init__(self, ops: type = KernelOps, bucket: int = 256, capture: bool = True, growth: float = 1.25) -> None:
        self.ops, self.bucket, self.capture, self.growth = ops, bucket, capture, growth
        self._families: dict[tuple, _Family] = {}
        self._side: torch.cuda.Stream | None = None  # where the uncaptured first run goes
        self.captures = 0  # graphs captured so far (a new bucket, or after the buffers grew)

    # copies and pickles carry the settings, not the graphs (they hold device addresses)
    def __getstate__(self) -> dict:
        return {"ops": self.ops, "bucket": self.bucket, "capture": self.capture, "growth": self.growth}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __deepcopy__(self, memo: dict) -> ConvScanGraphs:
        return ConvScanGraphs(**self.__getstate__())

    def forward(self, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, shape, chunk_size, dt_limit):  # noqa: ANN001, ANN201
        params = dict(zip(PARAMS, (weight, bias, A, D, dt_bias)))
        fam, length, t = self._load(xbc, dt, seq_idx, params, shape, chunk_size, dt_limit)
        (y,) = self._replay(fam, "fwd", length)
        return y[:, :t].clone(), ()  # nothing kept: the next layer's replay reuses the graph's memory

    def backward(self, dout, xbc, dt, weight, bias, A, D, dt_bias, seq_idx, shape, chunk_size, dt_limit, kept=()):  # noqa: ANN001, ANN201
        params = dict(zip(PARAMS, (weight, bias, A, D, dt_bias)))
        fam, length, t = self._load(xbc, dt, seq_idx, params, shape, chunk_size, dt_limit)
        _fill(fam.view("dout", length), dout, t, 0)
        dxbc, ddt, *grads = self._replay(fam, "bwd", length)
        return dxbc[:, :t].clone(), ddt[:, :t].clone(), *(g.clone() if g is not None else None for g in grads)

    def prepare(self, params: tuple, rest: tuple, rows: int, longest: int, dtype: torch.dtype) -> int:
        """Capture the forward and backward graphs of every bucket up to `longest` tokens per row for mixers with
        these conv+scan `params` and fixed arguments `rest` (bamba_ft.ops.mamba2.conv_scan_params), whose in_proj
        output is `dtype` (the autocast dtype, or the model's), on zero inputs, with buffers that hold `longest`;
        returns the number of graphs captured."""
        named, heads = dict(zip(PARAMS, params)), rest[0][0]
        weight, before = named["weight"], self.captures
        top = -(-longest // self.bucket) * self.bucket
        for length in range(top, 0, -self.bucket):  # the longest first: the buffers are sized once
            xbc = torch.zeros(rows, length, weight.shape[0], dtype=dtype, device=weight.device)
            dt = torch.zeros(rows, length, heads, dtype=dtype, device=weight.device)
            fam, _, _ = self._load(xbc, dt, None, named, *rest, growth=1.0)
            self._replay(fam, "fwd", length)
            self._replay(fam, "bwd", length)
        return self.captures - before

    # ------------------------------------------------------------------------------------------------------

    def _load(self, xbc, dt, seq_idx, params, shape, chunk_size, dt_limit, growth=None):  # noqa: ANN001, ANN202
        """Copy one call's tensors into the static buffers of its bucket; (family, bucket length, tokens)."""
        rows, t, _ = xbc.shape
        length = -(-t // self.bucket) * self.bucket
        key = (rows, xbc.shape[-1], xbc.dtype, dt.dtype, xbc.device, shape, chunk_size, dt_limit,
               *((None, None) if v is None else (v.shape, v.dtype) for v in params.values()))
        fam = self._families.get(key)
        if fam is None or fam.capacity < length:
            if fam is not None and self.capture:
                torch.cuda.synchronize(xbc.device)  # the old graphs may still be running on the old buffers
            capacity = -(-int(length * (growth or self.growth)) // self.bucket) * self.bucket
            fam = self._families[key] = _Family({"xbc": xbc, "dt": dt, **params}, rows, capacity, shape, chunk_size,
                                                dt_limit, self.capture)
        _fill(fam.view("xbc", length), xbc, t, 0)
        _fill(fam.view("dt", length), dt, t, 0)
        seq = fam.view("seq", length)
        if seq_idx is None:
            seq[:, :t].zero_()
        else:
            seq[:, :t].copy_(seq_idx)
        if t < length:  # the padded tail is one more sequence
            seq[:, t:].copy_(seq[:, t - 1 : t] + 1)
        names = [k for k, v in params.items() if v is not None]
        torch._foreach_copy_([fam.params[k] for k in names], [params[k] for k in names])
        return fam, length, t

    def _replay(self, fam: _Family, direction: str, length: int) -> Outputs:
        graph = fam.graphs.get((direction, length))
        if graph is None:
            body = (self._forward_body if direction == "fwd" else self._backward_body)(fam, length)
            graph = fam.graphs[(direction, length)] = self._capture(body, fam.pool) if self.capture else _Direct(body)
            self.captures += 1
        return graph.replay()

    def _forward_body(self, fam: _Family, length: int) -> Callable[[], Outputs]:
        v = {k: fam.view(k, length) for k in ("xbc", "dt", "seq", "y")}
        p = fam.params

        def body() -> Outputs:
            out, _ = conv_scan_forward_kernels(self.ops, v["xbc"], v["dt"], p["weight"], p["bias"], p["A"], p["D"],
                                               p["dt_bias"], v["seq"], fam.shape, fam.chunk_size, fam.dt_limit)
            return (v["y"].copy_(out),)

        return body

    def _backward_body(self, fam: _Family, length: int) -> Callable[[], Outputs]:
        v = {k: fam.view(k, length) for k in ("xbc", "dt", "seq", "dout", "dxbc", "ddt")}
        p = fam.params

        def body() -> Outputs:  # (dxbc, ddt, dweight, dbias, dA, dD, ddt_bias)
            return conv_scan_backward_kernels(self.ops, v["dout"], v["xbc"], v["dt"], p["weight"], p["bias"], p["A"],
                                              p["D"], p["dt_bias"], v["seq"], fam.shape, fam.chunk_size, fam.dt_limit,
                                              dxbc=v["dxbc"], ddt=v["ddt"])

        return body

    def _capture(self, body: Callable[[], Outputs], pool: tuple) -> _Captured:
        # Run once outside the capture: Triton compiles and autotunes there (both synchronise the device).
        side = self._side = self._side or torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                outputs = body()
        except Exception as e:
            raise RuntimeError(
                "Capturing the Mamba-2 mixer's kernels as a CUDA graph failed (see the error above).\n"
                "Fix: train with model.cuda_graphs=false."
            ) from e
        return _Captured(graph, outputs)


def _fill(dst: torch.Tensor, src: torch.Tensor, t: int, tail: float) -> None:
    """dst[:, :t] = src and dst[:, t:] = tail."""
    dst[:, :t].copy_(src)
    if t < dst.shape[1]:
        dst[:, t:].fill_(tail)
