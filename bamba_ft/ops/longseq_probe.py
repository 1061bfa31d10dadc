"""GPU probe: one Bamba-9B-shaped mixer layer (bf16, random weights) at very long rows, every stage checked.

    python -m bamba_ft.ops.longseq_probe --out DIR [--tokens 120000 131072 262144]

Each case runs in its own process (a kernel that writes out of bounds can poison the CUDA context) and appends
one JSON line to DIR/probe.jsonl. Checks, per row length T:
- `layer`: in_proj -> conv+scan -> gated norm -> out_proj, forward and backward, on one sequence and on a packed
  row whose last sequence (4,096 tokens) starts past the 32-bit offset point. Every intermediate and gradient is
  counted for non-finite values; the packed row's last sequence is compared with the same layer run on that
  sequence alone (sequences are independent, so these must agree up to bf16 rounding). Run once as shipped
  (`pieces`: long rows split) and once with the split disabled (`single_call`: the kernels as before the fix).
- `layouts`: each kernel called once on the strided slices of in_proj's output (what the single call passes) and
  once on contiguous copies, to attribute a difference to the argument whose offsets overflow.
- `attention`, `loss`, `swiglu`: torch's varlen attention, the chunked LM-head loss and the compiled SwiGLU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

LAST = 4096  # tokens of the packed row's last sequence


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def nonfinite(t: torch.Tensor | None) -> int:
    return -1 if t is None else int((~torch.isfinite(t)).sum())


def build_mixer():  # noqa: ANN201
    from transformers import BambaConfig
    from transformers.models.bamba.modeling_bamba import BambaMixer

    from bamba_ft.model.shapes import SHAPES
    from bamba_ft.ops.mamba2 import FusedGatedRMSNorm, SegmentAwareBambaMixer

    torch.manual_seed(0)
    config = BambaConfig(**SHAPES["bamba-9b"])
    mixer = BambaMixer(config, layer_idx=0)
    mixer.__class__ = SegmentAwareBambaMixer
    mixer.norm.__class__ = FusedGatedRMSNorm
    with torch.no_grad():  # non-default values, at the scale of a trained layer
        mixer.A_log.copy_(torch.log(torch.rand(mixer.num_heads) * 15 + 1))
        mixer.dt_bias.copy_(torch.randn(mixer.num_heads) * 0.5 - 3)
        mixer.D.copy_(torch.randn(mixer.num_heads))
        mixer.norm.weight.copy_(1 + 0.1 * torch.randn_like(mixer.norm.weight))
    return mixer.cuda().to(torch.bfloat16).train(), config


def packed_ids(t: int) -> torch.Tensor:
    lengths = [t // 2, t - t // 2 - LAST, LAST]
    return torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None].to(torch.int32).cuda()


def run_layer(mixer, h: torch.Tensor, w: torch.Tensor, seq_idx: torch.Tensor | None) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The mixer's forward (as `mixer_forward` runs it) and backward, keeping every intermediate and gradient."""
    from bamba_ft.ops.mamba2 import conv_scan

    h = h.detach().requires_grad_()
    b, t, _ = h.shape
    zxbcdt = mixer.in_proj(h)
    zxbcdt.retain_grad()
    gate, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    y = conv_scan(mixer, xbc, dt, seq_idx)
    y.retain_grad()
    yn = mixer.norm(y.reshape(b, t, -1), gate)
    yn.retain_grad()
    out = mixer.out_proj(yn.to(h.dtype))
    out.backward(w)  # the gradient of sum(out * w), without a float copy of either
    g = zxbcdt.grad
    got = {"in_proj": zxbcdt.detach(), "scan": y.detach(), "norm": yn.detach(), "out_proj": out.detach(),
           "d_norm": yn.grad, "d_scan": y.grad, "d_gate": g[..., : mixer.intermediate_size],
           "d_xbc": g[..., mixer.intermediate_size : -mixer.num_heads], "d_dt": g[..., -mixer.num_heads :],
           "d_hidden": h.grad}
    return got


def case_layer(t: int, packed: bool, pieces: bool) -> dict:
    from bamba_ft.ops import longseq

    if not pieces:
        longseq.OFFSET_LIMIT = 2**62  # the single-call path, as before the split existed
    mixer, config = build_mixer()
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(1, t, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(1, t, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
    seq = packed_ids(t) if packed else None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    got = run_layer(mixer, h, w, seq)
    torch.cuda.synchronize()
    row: dict = {"seconds": time.perf_counter() - t0, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                 "nonfinite": {k: nonfinite(v) for k, v in got.items()}}
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
    row["nonfinite_param_grads"] = {n: nonfinite(v) for n, v in grads.items() if nonfinite(v)}
    if packed:  # the last sequence alone: an independent computation whose offsets are small
        mixer.zero_grad(set_to_none=True)
        ref = run_layer(mixer, h[:, -LAST:], w[:, -LAST:], None)
        row["last_seq_rel_err"] = {k: rel(got[k][:, -LAST:], ref[k]) for k in got}
    else:  # causality: the first tokens alone
        mixer.zero_grad(set_to_none=True)
        ref = run_layer(mixer, h[:, :LAST], w[:, :LAST], None)
        row["prefix_rel_err"] = {k: rel(got[k][:, :LAST], ref[k]) for k in got if not k.startswith("d_")}
        torch.save({k: got[k][:, -LAST:].cpu() for k in ("scan", "norm", "out_proj", "d_hidden", "d_xbc")},
                   f"/tmp/probe_one_{t}_{int(pieces)}.pt")
        other = Path(f"/tmp/probe_one_{t}_{int(not pieces)}.pt")
        if other.exists():  # the other path's tail, from the earlier process
            prev = torch.load(other)
            row["tail_rel_err_vs_other_path"] = {k: rel(got[k][:, -LAST:].cpu(), v) for k, v in prev.items()}
    return row


def case_layouts(t: int, part: str = "forward") -> dict:
    """Each kernel on the single call's strided arguments against the same on contiguous copies.

    The strided call of each kernel comes after every contiguous one, and each result is printed as it is
    known: a call that faults (run with CUDA_LAUNCH_BLOCKING=1) leaves the earlier results and its traceback.
    """
    from bamba_ft.ops.kernels import KernelOps, channel_last, conv_scan_backward_kernels, split_xbc

    mixer, config = build_mixer()
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        zxbcdt = mixer.in_proj(torch.randn(1, t, config.hidden_size, device="cuda", dtype=torch.bfloat16, generator=g))
    gate, xbc, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    shape = (mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size)
    weight, bias = mixer.conv1d.weight.detach().squeeze(1), mixer.conv1d.bias.detach()
    A = -torch.exp(mixer.A_log.detach().float())
    D, dt_bias, limit = mixer.D.detach(), mixer.dt_bias.detach(), tuple(mixer.time_step_limit)
    row: dict = {"strides": {"xbc": xbc.stride(1), "dt": dt.stride(1), "gate": gate.stride(1)},
                 "max_offset_elements": {"xbc/dt/gate slices": (t - 1) * zxbcdt.stride(1) + zxbcdt.shape[-1],
                                         "conv out (dense)": t * mixer.conv_dim, "scan out": t * 8192}}

    def note(key: str, value: object) -> None:
        row[key] = value
        torch.cuda.synchronize()
        print("PARTIAL " + json.dumps(row), flush=True)

    if part == "backward":
        x_c = xbc.contiguous()
        x, B, C = split_xbc(KernelOps.conv_fwd(channel_last(x_c), weight, bias, None).transpose(1, 2), shape)
        dout = torch.randn_like(x)
        del x, B, C
        args = (weight, bias, A, D, dt_bias, None, shape, mixer.chunk_size, limit)
        b_c = conv_scan_backward_kernels(KernelOps, dout, x_c, dt.contiguous(), *args)
        note("backward nonfinite (contiguous xbc, dt)", [nonfinite(v) for v in b_c])
        b_s = conv_scan_backward_kernels(KernelOps, dout, xbc, dt, *args)
        note("backward nonfinite (strided slices)", [nonfinite(v) for v in b_s])
        for name, a, c in zip(["dxbc", "ddt", "dweight", "dbias", "dA", "dD", "ddt_bias"], b_s, b_c):
            row[f"backward {name}: strided vs contiguous"] = rel(a, c)
        return row
    conv_c = KernelOps.conv_fwd(channel_last(xbc.contiguous()), weight, bias, None).transpose(1, 2)
    conv_s = KernelOps.conv_fwd(channel_last(xbc), weight, bias, None).transpose(1, 2)
    note("conv: strided vs contiguous input", rel(conv_s, conv_c))
    del conv_s
    x, B, C = split_xbc(conv_c, shape)
    dt_c = dt.contiguous()

    def scan(x, dt, B, C):  # noqa: ANN001, ANN202
        return KernelOps.scan_fwd(x, dt, A, B, C, mixer.chunk_size, D, dt_bias, None, limit)

    y_c = scan(x, dt_c, B, C)
    note("scan nonfinite (contiguous dt)", nonfinite(y_c))
    yf = y_c.reshape(1, t, -1)
    n_c = mixer.norm(yf, gate.contiguous())
    note("gated norm nonfinite (contiguous gate)", nonfinite(n_c))
    from bamba_ft.ops import longseq

    longseq.OFFSET_LIMIT = 2**62  # the norm's single call
    n_s = mixer.norm(yf, gate)
    note("gated norm: strided gate vs contiguous gate", rel(n_s, n_c))
    del n_s, n_c, yf
    y_s = scan(x, dt, B, C)
    note("scan: strided dt vs contiguous dt", [rel(y_s, y_c), nonfinite(y_s)])
    return row


def case_attention(t: int) -> dict:
    from bamba_ft.ops.attention import _varlen_fn, _varlen_params

    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(t, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    k, v = (torch.randn(t, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True) for _ in "kv")
    lengths = [t // 2, t - t // 2 - LAST, LAST]
    cu = torch.tensor([0, lengths[0], lengths[0] + lengths[1], t], device="cuda", dtype=torch.int32)
    params = _varlen_params()

    def attend(q, k, v, cu, longest):  # noqa: ANN001, ANN202  (as bamba_ft.ops.attention calls it)
        extra = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(4, dim=1) for x in (k, v))
        return _varlen_fn()(q, k, v, cu, cu, longest, longest, **extra)

    out = attend(q, k, v, cu, max(lengths))
    out.float().pow(2).sum().backward()
    grads = [x.grad[-LAST:].clone() for x in (q, k, v)]
    tail = [x[-LAST:].detach().requires_grad_() for x in (q, k, v)]
    ref = attend(*tail, torch.tensor([0, LAST], device="cuda", dtype=torch.int32), LAST)
    ref.float().pow(2).sum().backward()
    return {"nonfinite": nonfinite(out), "last_seq_rel_err": rel(out[-LAST:], ref),
            "grad_rel_err": [rel(a, x.grad) for a, x in zip(grads, tail)]}


def case_loss(t: int) -> dict:
    from bamba_ft.ops.loss import head_loss_sum

    g = torch.Generator(device="cuda").manual_seed(3)
    head = torch.nn.Linear(4096, 128256, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    targets = torch.randint(0, 128256, (t,), device="cuda", generator=g)
    total = head_loss_sum(hidden, targets, head)
    total.backward()
    tail = hidden[-LAST:].detach().requires_grad_()
    part = head_loss_sum(tail, targets[-LAST:], head)
    part.backward()
    return {"loss_per_token": float(total) / t, "nonfinite_grad": nonfinite(hidden.grad),
            "tail_grad_rel_err": rel(hidden.grad[-LAST:], tail.grad)}


def case_swiglu(t: int) -> dict:
    from bamba_ft.ops.fused import swiglu, swiglu_backward, swiglu_forward

    g = torch.Generator(device="cuda").manual_seed(4)
    gate, up = (torch.randn(t, 14336, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in "gu")
    out = swiglu(gate, up)
    out.backward(torch.ones_like(out))
    n = LAST
    ref = swiglu_forward(gate[-n:].detach(), up[-n:].detach())
    dg, du = swiglu_backward(gate[-n:].detach(), up[-n:].detach(), torch.ones_like(ref))
    return {"elements": t * 14336, "nonfinite": nonfinite(out), "tail_rel_err": rel(out[-n:], ref),
            "tail_grad_rel_err": [rel(gate.grad[-n:], dg), rel(up.grad[-n:], du)]}


CASES = {"layer": case_layer, "layouts": case_layouts, "attention": case_attention, "loss": case_loss,
         "swiglu": case_swiglu}


def longseq_needed(t: int) -> bool:
    from bamba_ft.ops import longseq

    return longseq.needs_pieces(1, t, 16_768)  # Bamba-9B's in_proj row


def one_case(spec: dict) -> dict:
    fn = CASES[spec["case"]]
    kwargs = {k: v for k, v in spec.items() if k != "case"}
    try:
        return {**spec, **fn(**kwargs)}
    except Exception as e:  # a case that fails is a result
        return {**spec, "error": f"{type(e).__name__}: {str(e)[:300]}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tokens", type=int, nargs="+", default=[120_000, 131_072, 262_144])
    ap.add_argument("--cases", nargs="+", default=["layer", "layouts", "attention", "loss", "swiglu"])
    ap.add_argument("--single-call", action="store_true", help="also run the layer with the split disabled")
    ap.add_argument("--packed-only", action="store_true", help="layer: only the packed row")
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.spec:  # child process: one case
        print("RESULT " + json.dumps(one_case(json.loads(a.spec))), flush=True)
        return
    specs = []
    longest = max(a.tokens)
    for case in a.cases:
        for t in a.tokens:
            split = longseq_needed(t)
            if case == "layer":  # below the split point, shipped and single-call paths are the same code
                for packed in (False, True) if split and not a.packed_only else (True,):
                    specs += [{"case": "layer", "t": t, "packed": packed, "pieces": p}
                              for p in ([True, False] if a.single_call and split else [True])]
            elif case == "layouts" and split:
                specs += [{"case": case, "t": t, "part": part} for part in ("forward", "backward")]
            elif case in ("attention", "loss", "swiglu") and t == longest:
                specs.append({"case": case, "t": t})
    a.out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        t0 = time.perf_counter()
        env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1"} if spec["case"] == "layouts" else None
        p = subprocess.run([sys.executable, "-m", "bamba_ft.ops.longseq_probe", "--spec", json.dumps(spec)],
                           capture_output=True, text=True, timeout=400, env=env)
        line = next((x[7:] for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line:
            row = json.loads(line)
        else:  # the last partial results and the traceback's last frames
            partial = [x[8:] for x in p.stdout.splitlines() if x.startswith("PARTIAL ")]
            frames = [x.strip() for x in p.stderr.splitlines() if x.strip().startswith("File ")][-4:]
            row = {**spec, **(json.loads(partial[-1]) if partial else {}),
                   "error": f"process exit {p.returncode}: {p.stderr.strip().splitlines()[-1][:300] if p.stderr else ''}",
                   "frames": frames}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        with open(a.out / "probe.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
