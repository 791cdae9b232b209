"""Issue #4: SSD scan passes with all heads of a chunk in one program, checked and timed.

- ``chunk_states``: the forward's chunk states of ``ssd4rec.ops.ssd_scan_heads``
  (``chunk_states_all_heads``): mamba_ssm 2.3.2's ``_chunk_state_fwd`` with fp32 states.
- ``fwd``: the output pass of the same module (``backend: triton_heads``), which
  computes mamba_ssm 2.3.2's ``_chunk_scan_fwd`` output (no z, one group, D per head); its
  docstring has the formula.
- ``dx``: the backward's passes over C·Bᵀ in the same module (``pair_grads_all_heads``): dx, ddt
  and dD (mamba_ssm's ``_chunk_scan_chunk_state_bwd_dx``, the largest kernel of a training
  step), dCB (``_chunk_scan_bwd_dcb``), ddA (``_chunk_scan_bwd_ddAcs_stable``) and B's gradient
  through the chunk states (``_chunk_state_bwd_db``) in one kernel.
- ``states``: the backward's pass over the chunk states in the same module
  (``state_grads_all_heads``): mamba_ssm's ``_chunk_scan_bwd_dstates`` and ``_chunk_scan_bwd_dC``
  in one kernel.
- ``ddA``: the backward's last step for the decays (``ssd4rec.ops.ddA_steps``): their gradient
  summed from its parts and its reverse cumulative sum, against the PyTorch operations that
  took that step until session 17 (``ddA_steps_reference``).
- ``backward`` (GPU only): the module's whole scan backward (``_backward``: mamba_ssm's steps
  with ``pair_grads_all_heads``) against mamba_ssm's own ``_mamba_chunk_scan_combined_bwd``.

(A separate prototype of the ddA pass was measured here in session 11 and removed: 0.94x at
chunk 128 and 1.40x at 256 on an H100, and its float64 check failed on the GPU though it passed
under the interpreter. Its code is in git history, 8f2a918. The fused kernel computes ddA with
plain sums instead of its cumulative sum.)

Each loads a chunk's (Q, Q) C·Bᵀ block once instead of once per head. This script

- checks each against a float64 loop of its formula on small shapes (``--check``; on a CPU
  under Triton's interpreter, which cannot run mamba_ssm's own kernels), and
- on a GPU, compares each with mamba_ssm's kernel at the ML-1M step's shape (bf16, 245,760
  tokens, mean history 120) and times both in alternating rounds in one process.

    TRITON_INTERPRET=1 python scripts/bench_scan_heads.py --check    # CPU: against the loops
    PYTHONPATH=. python3 scripts/bench_scan_heads.py                 # GPU: against mamba_ssm, timed

The inputs of ``random_inputs`` (float32 unless asked):

    CB: (batch, nchunks, 1, Q, Q) float32, C[t]·B[s], already 0 across sequences
    x: (batch, seqlen, H, P); dt, dA (the chunk's cumulative dt*A): (batch, H, nchunks, Q) float32
    C: (batch, seqlen, 1, N); state_in: (batch, nchunks, H, P, N); D: (H,); seq: (batch, seqlen) int32
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scan import packed_seq_idx  # noqa: E402  (scripts/, this file's folder)

try:
    import triton
    from ssd4rec.ops.ssd_scan_heads import (chunk_states_all_heads, pair_grads_all_heads, scan_out_all_heads,
                                            state_grads_all_heads)
    from ssd4rec.ops.ddA_steps import ddA_steps, ddA_steps_reference
except ImportError as err:  # the CPU install has no triton
    if __name__ == "__main__":
        sys.exit(f"bench_scan_heads.py needs triton ({err}); on a CPU: pip install triton, then "
                 "TRITON_INTERPRET=1 python scripts/bench_scan_heads.py --check")
    raise


def reference(cb, x, dt, dA, C, states, D, seq_idx):
    """``ssd4rec.ops.ssd_scan_heads``' formula as a loop over chunks, in float64."""
    batch, seqlen, nheads, p = x.shape
    q = cb.shape[-1]
    y = torch.zeros(batch, seqlen, nheads, p, dtype=torch.float64)
    x64, C64 = x.double(), C[:, :, 0].double()
    for c in range(cb.shape[1]):
        lo, hi = c * q, min(seqlen, (c + 1) * q)
        w = hi - lo
        block = torch.tril(cb[:, c, 0, :w, :w].double())                          # (b, t, s)
        a = dA[:, :, c, :w].double()                                             # (b, h, t)
        decay = torch.exp(torch.clamp(a[..., :, None] - a[..., None, :], max=0.0))
        weights = block[:, None] * decay * dt[:, :, c, None, :w].double()        # (b, h, t, s)
        y[:, lo:hi] = torch.einsum("bhts,bshp->bthp", weights, x64[:, lo:hi])
        if c > 0:
            carries = (seq_idx[:, lo:hi] == seq_idx[:, lo - 1:lo]).double()      # (b, t)
            inter = torch.einsum("btn,bhpn->bthp", C64[:, lo:hi], states[:, c].double())
            y[:, lo:hi] += inter * (torch.exp(a).transpose(1, 2) * carries[..., None])[..., None]
    return y if D is None else y + x64 * D.double()[:, None]


def random_inputs(batch, seqlen, nheads, p, n, q, mean_len, device, dtype, gen):
    """Valid inputs: sequence ids along each row, C·Bᵀ zeroed across sequences (as mamba_ssm's
    _bmm_chunk_fwd with seq_idx makes it), decaying cumulative dA within each chunk."""
    nchunks = -(-seqlen // q)
    seq_idx = packed_seq_idx(batch, seqlen, mean_len, gen).long()
    B = torch.randn(batch, nchunks * q, n, generator=gen) * n ** -0.5
    C = torch.randn(batch, nchunks * q, n, generator=gen) * n ** -0.5
    padded = torch.nn.functional.pad(seq_idx, (0, nchunks * q - seqlen), value=-1)
    Bc, Cc, sc = (t.view(batch, nchunks, q, *t.shape[2:]) for t in (B, C, padded))
    cb = torch.einsum("bctn,bcsn->bcts", Cc, Bc) * (sc[..., :, None] == sc[..., None, :])
    dt = torch.rand(batch, nheads, nchunks, q, generator=gen) * 0.2
    dt.view(batch, nheads, nchunks * q)[..., seqlen:] = 0.0  # past the row's end, as _chunk_cumsum_fwd leaves it
    A = -torch.exp(torch.rand(nheads, generator=gen) * 2.0)
    dA = torch.cumsum(dt * A[None, :, None, None], dim=-1)
    x = torch.randn(batch, seqlen, nheads, p, generator=gen)
    states = torch.randn(batch, nchunks, nheads, p, n, generator=gen)
    D = torch.randn(nheads, generator=gen)
    to = dict(device=device)
    return (cb[:, :, None].contiguous().to(**to), x.to(dtype=dtype, **to), dt.to(**to), dA.to(**to),
            C[:, :seqlen, None].to(dtype=dtype, **to), states.to(dtype=dtype, **to), D.to(**to),
            seq_idx.to(torch.int32).to(**to))


def reference_dx(cb, x, dout, dt, dA, B, dstates, D, seq_idx):
    """The backward's passes of ``pair_grads_all_heads`` as loops over chunks, in float64 ->
    (dx, ddt, dD, dCB, dB_states, ddA), ddA per step as mamba_ssm's ``_chunk_scan_bwd_ddAcs_stable``
    and ``_chunk_state_bwd_db`` give it together: the sum of M[t, s] over the pairs s < j <= t
    and of E[s] over the tokens s < j, whose decays cover step j."""
    batch, seqlen, nheads, p = x.shape
    q = cb.shape[-1]
    g = torch.zeros(batch, seqlen, nheads, p, dtype=torch.float64)
    x64, dout64, B64 = x.double(), dout.double(), B[:, :, 0].double()
    dt64 = torch.zeros(batch, seqlen, nheads, dtype=torch.float64)
    dCB = torch.zeros(cb.shape, dtype=torch.float64)
    dB = torch.zeros(B.shape, dtype=torch.float64)
    ddA = torch.zeros(dt.shape, dtype=torch.float64)
    for c in range(cb.shape[1]):
        lo, hi = c * q, min(seqlen, (c + 1) * q)
        w = hi - lo
        block = torch.triu(cb[:, c, 0, :w, :w].double().transpose(1, 2))          # (b, s, t), t >= s
        a = dA[:, :, c, :w].double()                                             # (b, h, s)
        decay = torch.exp(torch.clamp(a[..., None, :] - a[..., :, None], max=0.0))  # (b, h, s, t)
        g[:, lo:hi] = torch.einsum("bhst,bthp->bshp", block[:, None] * decay, dout64[:, lo:hi])
        reaches = (seq_idx[:, lo:hi] == seq_idx[:, hi - 1:hi]).double()          # (b, s)
        to_end = torch.exp(torch.clamp(a[..., -1:] - a, max=0.0)).transpose(1, 2)  # (b, s, h)
        inter = torch.einsum("bsn,bhpn->bshp", B64[:, lo:hi], dstates[:, c].double())
        g[:, lo:hi] += inter * (to_end * reaches[..., None])[..., None]
        dt64[:, lo:hi] = dt[:, :, c, :w].double().transpose(1, 2)
        # through the chunk's outgoing state: B's gradient and the decays' (E)
        f = to_end * reaches[..., None] * dt64[:, lo:hi]                        # (b, s, h)
        dB[:, lo:hi, 0] = torch.einsum("bshp,bhpn->bsn", x64[:, lo:hi] * f[..., None], dstates[:, c].double())
        E = (inter * x64[:, lo:hi]).sum(-1) * f                                  # (b, s, h)
        # the pairs: dout[t] . x[s] decay dt[s], t >= s, within one sequence
        same = (seq_idx[:, lo:hi, None] == seq_idx[:, None, lo:hi]).double()     # (b, s, t)
        dots = torch.einsum("bthp,bshp->bhst", dout64[:, lo:hi], x64[:, lo:hi])
        pairs = torch.triu(dots * decay) * dt[:, :, c, :w, None].double()       # (b, h, s, t)
        dCB[:, c, 0, :w, :w] = (pairs.sum(1) * same).transpose(1, 2)
        M = pairs * block[:, None]
        for j in range(1, w):
            ddA[:, :, c, j] = M[..., :j, j:].sum(dim=(-1, -2)) + E[:, :j].sum(1)
    dx = g * dt64[..., None]
    ddt_tokens = (g * x64).sum(-1)                                               # (b, l, h)
    ddt = torch.zeros(dt.shape, dtype=torch.float64)
    for c in range(cb.shape[1]):
        lo, hi = c * q, min(seqlen, (c + 1) * q)
        ddt[:, :, c, :hi - lo] = ddt_tokens[:, lo:hi].transpose(1, 2)
    if D is None:
        return dx, ddt, None, dCB, dB, ddA
    return dx + dout64 * D.double()[:, None], ddt, (dout64 * x64).sum(dim=(0, 1, 3)), dCB, dB, ddA


def reference_states(C, dA, dout, states, seq_idx):
    """``state_grads_all_heads``' formulas as loops over chunks and heads, in float64 ->
    (dstates, dC_states, ddAcs), with chunk 0's dstates 0 (its state is 0)."""
    batch, seqlen, nheads, p = dout.shape
    nchunks, q = dA.shape[2], dA.shape[3]
    C64, dout64, st64 = C[:, :, 0].double(), dout.double(), states.double()
    dstates = torch.zeros(states.shape, dtype=torch.float64)
    dC = torch.zeros(batch, seqlen, C.shape[-1], dtype=torch.float64)
    ddA = torch.zeros(dA.shape, dtype=torch.float64)
    for b in range(batch):
        for c in range(1, nchunks):
            lo, hi = c * q, min(seqlen, (c + 1) * q)
            from_prev = (seq_idx[b, lo:hi] == seq_idx[b, lo - 1]).double()
            for h in range(nheads):
                scale = from_prev * torch.exp(dA[b, h, c, :hi - lo].double())
                dstates[b, c, h] = (dout64[b, lo:hi, h] * scale[:, None]).T @ C64[b, lo:hi]
                dc = (dout64[b, lo:hi, h] @ st64[b, c, h]) * scale[:, None]
                dC[b, lo:hi] += dc
                ddA[b, h, c, :hi - lo] = (dc * C64[b, lo:hi]).sum(-1)
    return dstates, dC[:, :, None], ddA


def reference_chunk_states(x, B, dt, dA, seq_idx):
    """``chunk_states_all_heads``' formula as a loop over chunks, in float64 -> (b, nchunks, H, P, N)."""
    batch, seqlen, nheads, p = x.shape
    nchunks, q = dt.shape[2], dt.shape[3]
    x64, B64 = x.double(), B[:, :, 0].double()
    states = torch.zeros(batch, nchunks, nheads, p, B.shape[-1], dtype=torch.float64)
    for c in range(nchunks):
        lo, hi = c * q, min(seqlen, (c + 1) * q)
        a = dA[:, :, c, :hi - lo].double()                                       # (b, h, s)
        reaches = (seq_idx[:, lo:hi] == seq_idx[:, hi - 1:hi]).double()          # (b, s)
        scale = torch.exp(torch.clamp(a[..., -1:] - a, max=0.0)) * dt[:, :, c, :hi - lo].double() * reaches[:, None]
        states[:, c] = torch.einsum("bhs,bshp,bsn->bhpn", scale, x64[:, lo:hi], B64[:, lo:hi])
    return states


def check_chunk_states(device="cpu", dtype=torch.float32, seed=0):
    """``chunk_states_all_heads`` against its float64 loop; returns the worst error."""
    worst = 0.0
    for (batch, seqlen, nheads, p, n, q) in ((2, 100, 3, 16, 16, 32), (1, 200, 2, 16, 32, 64), (1, 37, 1, 16, 16, 16)):
        cb, x, dt, dA, B, states, D, seq_idx = random_inputs(batch, seqlen, nheads, p, n, q, 9, device, dtype,
                                                             torch.Generator().manual_seed(seed))
        ours = chunk_states_all_heads(x, B, dt, dA, seq_idx)
        assert torch.isfinite(ours).all() and ours.dtype == torch.float32
        worst = max(worst, rel_err(ours, reference_chunk_states(*(t.cpu() for t in (x, B, dt, dA, seq_idx)))))
        # x a slice of a wider tensor, as the scan reads it from [x | B | C]
        wide = torch.zeros(batch, seqlen, nheads * p + 5, dtype=x.dtype, device=x.device)
        wide[..., 2:2 + nheads * p] = x.flatten(2)
        strided = chunk_states_all_heads(wide[..., 2:2 + nheads * p].unflatten(-1, (nheads, p)), B, dt, dA, seq_idx)
        assert torch.equal(strided, ours)
    return worst


def states_inputs(inputs):
    """random_dx_inputs' tensors in the state passes' roles (B's random tensor as C, the states
    as the states entering each chunk) -> C, dA, dout, states, seq_idx."""
    cb, x, dout, dt, dA, C, states, D, seq_idx = inputs
    return C, dA, dout, states, seq_idx


def check_states(device="cpu", dtype=torch.float32, seed=0):
    """``state_grads_all_heads`` against its float64 loop; returns the worst error."""
    worst = 0.0
    for (batch, seqlen, nheads, p, n, q) in ((2, 100, 3, 16, 16, 32), (1, 200, 2, 16, 32, 64), (1, 37, 1, 16, 16, 16)):
        inputs = states_inputs(random_dx_inputs(batch, seqlen, nheads, p, n, q, 9, device, dtype,
                                                torch.Generator().manual_seed(seed)))
        ours = state_grads_all_heads(*inputs)
        for a, r in zip(ours, reference_states(*(t.cpu() for t in inputs))):
            assert torch.isfinite(a).all()
            worst = max(worst, rel_err(a, r))
    return worst


def random_ddA_parts(batch, nheads, nchunks, k, q, device, gen):
    """The parts of the decays' gradient, as ``ddA_steps`` takes them: rows a slice of a buffer
    with more row blocks than are read (as the pair kernel leaves it), the others contiguous."""
    rows = torch.randn(batch, nheads, nchunks, k + 2, q, generator=gen).to(device)[:, :, :, :k]
    cols, into = (torch.randn(batch, nheads, nchunks, q, generator=gen).to(device) for _ in range(2))
    return rows, cols, into, torch.randn(batch, nheads, nchunks, generator=gen).to(device)


def check_ddA(device="cpu", seed=0):
    """``ddA_steps`` against its formula in float64 (``ddA_steps_reference``), with chunk counts
    that leave the last program's tile part empty and 1 to 4 row blocks; returns the worst error."""
    worst = 0.0
    gen = torch.Generator().manual_seed(seed)
    for (batch, nheads, nchunks, k, q) in ((2, 3, 5, 2, 32), (1, 2, 7, 1, 64), (1, 1, 1, 4, 16), (2, 2, 33, 3, 16)):
        parts = random_ddA_parts(batch, nheads, nchunks, k, q, device, gen)
        ours = ddA_steps(*parts)
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        worst = max(worst, rel_err(ours, ddA_steps_reference(*(t.double().cpu() for t in parts))))
    return worst


def pair_grads(*inputs):
    """``pair_grads_all_heads`` with its ddA per step, as mamba_ssm's kernels and the loop give it."""
    dx, ddt, dD, dCB, dB, ddAcs = pair_grads_all_heads(*inputs)
    return dx, ddt, dD, dCB, dB, ddAcs.flip([-1]).cumsum(dim=-1).flip([-1])


def random_dx_inputs(batch, seqlen, nheads, p, n, q, mean_len, device, dtype, gen):
    """random_inputs' tensors in the backward pair pass's roles (C's random tensor serves as B,
    the states as dstates: the formulas are linear in each), plus a random dout."""
    cb, x, dt, dA, B, dstates, D, seq_idx = random_inputs(batch, seqlen, nheads, p, n, q, mean_len, device, dtype, gen)
    dout = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
    return cb, x, dout, dt, dA, B, dstates, D, seq_idx


# float32 in the interpreter; on a GPU, Triton's float32 dots run in TF32 (10-bit mantissa)
TOLERANCE = {"cpu": 1e-5, "cuda": 5e-3}


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def check(device="cpu", dtype=torch.float32, seed=0):
    """The kernel against the float64 loop on a few small shapes; returns the worst error."""
    worst = 0.0
    for (batch, seqlen, nheads, p, n, q) in ((2, 100, 3, 16, 16, 32), (1, 64, 2, 16, 32, 64), (1, 37, 1, 16, 16, 16)):
        inputs = random_inputs(batch, seqlen, nheads, p, n, q, 9, device, dtype, torch.Generator().manual_seed(seed))
        if seqlen == 37:  # one shape without the D term (the kernel's HAS_D=False variant)
            inputs = (*inputs[:6], None, inputs[7])
        out = scan_out_all_heads(*inputs)
        assert torch.isfinite(out).all()
        worst = max(worst, rel_err(out, reference(*(None if t is None else t.cpu() for t in inputs))))
    return worst


def check_dx(device="cpu", dtype=torch.float32, seed=0):
    """The backward's fused passes against their float64 loop (dx, ddt, dD, dCB, dB_states, ddA);
    returns the worst error."""
    worst = 0.0
    for (batch, seqlen, nheads, p, n, q) in ((2, 100, 3, 16, 16, 32), (1, 64, 2, 16, 32, 64), (1, 37, 1, 16, 16, 16)):
        inputs = random_dx_inputs(batch, seqlen, nheads, p, n, q, 9, device, dtype, torch.Generator().manual_seed(seed))
        if seqlen == 37:  # one shape without the D term
            inputs = (*inputs[:7], None, inputs[8])
        ours = pair_grads(*inputs)
        ref = reference_dx(*(None if t is None else t.cpu() for t in inputs))
        for a, r in zip(ours, ref):
            if r is not None:
                assert torch.isfinite(a).all()
                worst = max(worst, rel_err(a, r))
        if batch == 2:  # x read from, and dx written into, slices of wider tensors (as of xBC)
            worst = max(worst, rel_err(pair_grads_strided(inputs), ref[0]))
    return worst


def pair_grads_strided(inputs):
    """dx of ``pair_grads_all_heads`` with x a slice of a wider tensor and dx written into a slice
    of another, wider still (offset 3), dout contiguous: three sets of strides. The rest of the wide output
    must stay untouched."""
    cb, x, dout, *rest = inputs
    batch, seqlen, nheads, p = x.shape
    width = nheads * p
    wide_x = torch.zeros(batch, seqlen, width + 8, dtype=x.dtype, device=x.device)
    wide_x[..., :width] = x.flatten(2)
    wide_dx = torch.full((batch, seqlen, width + 11), float("nan"), dtype=x.dtype, device=x.device)
    dx = wide_dx[..., 3:3 + width].unflatten(-1, (nheads, p))
    pair_grads_all_heads(cb, wide_x[..., :width].unflatten(-1, (nheads, p)), dout, *rest, dx=dx)
    outside = torch.cat([wide_dx[..., :3], wide_dx[..., 3 + width:]], dim=-1)
    assert outside.isnan().all(), "pair_grads_all_heads wrote outside the dx view"
    return dx


def compare(name, theirs, ours, repeats, labels=("mamba_ssm", "all heads")):
    """Relative differences of each output, then both timed in alternating rounds (median ms)."""
    out_theirs, out_ours = theirs(), ours()
    out_theirs = out_theirs if isinstance(out_theirs, tuple) else (out_theirs,)
    out_ours = out_ours if isinstance(out_ours, tuple) else (out_ours,)
    errs = [rel_err(a, b) for a, b in zip(out_ours, out_theirs) if b is not None]
    times = {label: [] for label in labels}
    for _ in range(3):
        for who, fn in zip(labels, (theirs, ours)):
            times[who].append(triton.testing.do_bench(fn, warmup=25, rep=repeats * 5, return_mode="median"))
    t_theirs, t_ours = (statistics.median(times[k]) for k in labels)
    print(f"{name}: {labels[0]} {t_theirs:.3f} ms, {labels[1]} {t_ours:.3f} ms ({t_ours / t_theirs:.2f}x), "
          f"relative difference {' / '.join(f'{e:.2e}' for e in errs)} (bf16)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check the kernels against the loops (CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--passes", nargs="+", default=["chunk_states", "fwd", "dx", "states", "ddA", "backward"],
                    choices=["chunk_states", "fwd", "dx", "states", "ddA", "backward"],
                    help="chunk_states, fwd, dx, states: the forward's chunk states and output pass, the "
                         "backward's pair pass (dx, dCB, ddA, dB) and its state pass (dstates, dC, ddA) of "
                         "ssd4rec.ops.ssd_scan_heads; ddA: the decays' reverse cumulative sum "
                         "(ssd4rec.ops.ddA_steps) against PyTorch operations; "
                         "backward: its whole scan backward against mamba_ssm's (GPU only)")
    ap.add_argument("--tokens", type=int, default=245_760)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, nargs="+", default=[128, 256], dest="chunk_sizes")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    checks = {"chunk_states": check_chunk_states, "fwd": check, "dx": check_dx, "states": check_states,
              "ddA": check_ddA}
    if args.check or not torch.cuda.is_available():
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("no GPU: run the check with TRITON_INTERPRET=1")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if not any(p in checks for p in args.passes):
            sys.exit("--passes backward runs mamba_ssm's kernels: GPU only (no --check)")
        errs = {p: checks[p](device) for p in args.passes if p in checks}
        for p, err in errs.items():
            print(f"{p} kernel vs float64 loop: worst relative error {err:.2e}")
        sys.exit(0 if max(errs.values()) < TOLERANCE[device] else 1)

    from ssd4rec.ops.ssd_scan import _load_triton_scan

    _, error = _load_triton_scan()  # mamba_ssm's import quirk handled there
    if error:
        sys.exit(f"mamba_ssm's Triton scan is not importable: {error}")
    from mamba_ssm.ops.triton.ssd_chunk_scan import (_chunk_scan_bwd_dC, _chunk_scan_bwd_dcb, _chunk_scan_bwd_ddAcs_stable,
                                                     _chunk_scan_bwd_dstates, _chunk_scan_fwd)
    from mamba_ssm.ops.triton.ssd_chunk_state import _chunk_state_bwd_db, _chunk_state_fwd
    from mamba_ssm.ops.triton.ssd_combined import _chunk_scan_chunk_state_bwd_dx, _mamba_chunk_scan_combined_bwd

    from ssd4rec.ops.ssd_scan_heads import _backward

    for p in args.passes:
        if p in checks:
            print(f"{p} check (fp32, tf32 dots): worst relative error {checks[p]('cuda'):.2e}", flush=True)
    gen = torch.Generator().manual_seed(1)
    length = args.tokens // args.rows
    for q in args.chunk_sizes:
        inputs = random_dx_inputs(args.rows, length, 32, 16, 64, q, 120, "cuda", torch.bfloat16, gen)
        cb, x, dout, dt, dA, BC, states, D, seq_idx = inputs
        if "chunk_states" in args.passes:  # BC as B
            compare(f"chunk {q}, chunk states (_chunk_state_fwd)",
                    lambda: _chunk_state_fwd(BC, x, dt, dA, seq_idx=seq_idx, states_in_fp32=True),
                    lambda: chunk_states_all_heads(x, BC, dt, dA, seq_idx), args.repeats)
        if "fwd" in args.passes:  # BC as C, states as the states entering each chunk
            compare(f"chunk {q}, output pass (_chunk_scan_fwd)",
                    lambda: _chunk_scan_fwd(cb, x, dt, dA, BC, states, D=D, seq_idx=seq_idx)[0],
                    lambda: scan_out_all_heads(cb, x, dt, dA, BC, states, D, seq_idx), args.repeats)
        if "dx" in args.passes:  # BC as B, states as dstates; outputs dx, ddt, dD
            def theirs():
                dx, ddt, dD = _chunk_scan_chunk_state_bwd_dx(x, dt, dA, BC, cb, dout, states, D=D,
                                                             seq_idx=seq_idx)[:3]
                dCB = _chunk_scan_bwd_dcb(x, dt, dA, dout, seq_idx=seq_idx, ngroups=1)
                dB, ddA_states = _chunk_state_bwd_db(x, dt, dA, states, seq_idx=seq_idx, B=BC, ngroups=1)
                return dx, ddt, dD, dCB, dB, _chunk_scan_bwd_ddAcs_stable(x, dt, dA, dout, cb) + ddA_states

            compare(f"chunk {q}, fused backward passes (_chunk_scan_chunk_state_bwd_dx, _chunk_scan_bwd_dcb, "
                    "_chunk_scan_bwd_ddAcs_stable, _chunk_state_bwd_db: dx, ddt, dD, dCB, dB, ddA)",
                    theirs, lambda: pair_grads(*inputs), args.repeats)
        if "states" in args.passes:  # BC as C, states as the states entering each chunk
            C_s, dA_s, dout_s, states_s, seq_s = states_inputs(inputs)
            states_s = states_s.float()
            # The state entering chunk 0 is 0 in the scan. mamba_ssm's dC pass would read a
            # random one there (session 15's run did: dC and ddA then differed by 3e-2).
            states_s[:, 0] = 0

            def theirs_states():
                dstates = _chunk_scan_bwd_dstates(C_s, dA_s, dout_s, seq_idx=seq_s, dtype=torch.float32)
                dstates[:, 0] = 0  # the state entering chunk 0 is 0; ours leaves its gradient 0
                return (dstates, *_chunk_scan_bwd_dC(states_s, dA_s, dout_s, seq_idx=seq_s, C=C_s, ngroups=1))

            compare(f"chunk {q}, state passes (_chunk_scan_bwd_dstates, _chunk_scan_bwd_dC: dstates, dC, ddA)",
                    theirs_states, lambda: state_grads_all_heads(C_s, dA_s, dout_s, states_s, seq_s), args.repeats)
        if "ddA" in args.passes:  # the pair kernel's row blocks at BLOCK_M 64 (K = q / 64) and 16
            for k in sorted({max(q // 64, 1), q // 16}):
                parts = random_ddA_parts(args.rows, 32, length // q, k, q, "cuda", gen)
                compare(f"chunk {q}, decays' reverse cumsum from {k} row block(s) (float32)",
                        lambda: ddA_steps_reference(*parts), lambda: ddA_steps(*parts), args.repeats,
                        labels=("PyTorch", "one kernel"))
        if "backward" in args.passes:  # the scan's own inputs, as the model feeds them under bf16 autocast
            x_, dt_, B_, C_ = (torch.randn(args.rows, length, *shape, generator=gen).to("cuda", torch.bfloat16) * scale
                               for shape, scale in (((32, 16), 1.0), ((32,), 0.5), ((1, 64), 0.125), ((1, 64), 1.0)))
            A_ = -torch.exp(torch.rand(32, generator=gen) * 2.7).cuda()
            D_, bias_ = torch.randn(32, generator=gen).cuda(), (torch.randn(32, generator=gen) * 0.5).cuda()
            dy_ = torch.randn(x_.shape, generator=gen).to("cuda", torch.bfloat16)
            theirs = lambda: tuple(_mamba_chunk_scan_combined_bwd(  # noqa: E731
                dy_, x_, dt_, A_, B_, C_, torch.empty_like(x_), q, D=D_, dt_bias=bias_, seq_idx=seq_idx,
                dt_softplus=True)[i] for i in (0, 1, 2, 3, 4, 5, 7))
            compare(f"chunk {q}, whole scan backward (dx, ddt, dA, dB, dC, dD, ddt_bias)", theirs,
                    lambda: _backward(dy_, x_, dt_, A_, B_, C_, q, D_, bias_, seq_idx, True, (0.0, float("inf"))),
                    args.repeats)

if __name__ == "__main__":
    main()
