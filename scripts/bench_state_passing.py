"""Issue #4: the scan's chunk-to-chunk state passing as a parallel scan over chunks, checked and
timed (``ssd4rec.ops.state_passing``).

- ``--check``: the forward and backward kernels against a float64 loop of the recurrence, whose
  gradients autograd takes (so the backward's formulas are checked, not copied). On a CPU it
  runs under Triton's interpreter; on a GPU it also compares with mamba_ssm's
  ``_state_passing_fwd`` and ``_state_passing_bwd``.
- otherwise (GPU): ours against mamba_ssm's at the ML-1M step's shape (two rows of 122,880
  tokens, chunk 128, 32 heads, 16 x 64 state channels, histories of mean length 120), forward
  and backward, timed with CUDA events in alternating rounds in one process.

    TRITON_INTERPRET=1 python scripts/bench_state_passing.py --check    # CPU: against the loop
    PYTHONPATH=. python3 scripts/bench_state_passing.py --check         # GPU: loop and mamba_ssm
    PYTHONPATH=. python3 scripts/bench_state_passing.py                 # GPU: timed

Inputs: states (b, nchunks, h, dim) float32; dA_last (b, h, nchunks) float32; seq_idx (b, l).
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scan import packed_seq_idx  # noqa: E402  (scripts/, this file's folder)

try:
    from ssd4rec.ops.state_passing import state_passing_bwd, state_passing_fwd
except ImportError as err:  # the CPU install has no triton
    if __name__ == "__main__":
        sys.exit(f"bench_state_passing.py needs triton ({err}); on a CPU: pip install triton, then "
                 "TRITON_INTERPRET=1 python scripts/bench_state_passing.py --check")
    raise

# Largest relative error accepted against the float64 loop: float32 sums in another order.
TOLERANCE = 1e-5


def reference(states, dA_last, seq_idx, chunk_size):
    """The recurrence as a loop over chunks, in the inputs' dtype (differentiable):
    out[c] = S[c - 1], S[c] = a[c] S[c - 1] + states[c], a[c] = exp(dA_last[c]) when chunk c's
    last token and chunk c - 1's are of one sequence, else 0."""
    batch, nchunks, nheads, dim = states.shape
    seqlen = seq_idx.shape[1]
    ends = [min((c + 1) * chunk_size, seqlen) - 1 for c in range(nchunks)]
    outs = [torch.zeros_like(states[:, 0])]
    state = torch.zeros_like(states[:, 0])
    for c in range(nchunks):
        if c > 0:
            same = (seq_idx[:, ends[c]] == seq_idx[:, ends[c - 1]]).to(states.dtype)  # (b,)
            state = (torch.exp(dA_last[:, :, c]) * same[:, None])[..., None] * state
        state = state + states[:, c]
        if c + 1 < nchunks:
            outs.append(state)
    return torch.stack(outs, dim=1)


def random_inputs(batch, seqlen, chunk_size, nheads, dim, mean_len, device, gen):
    nchunks = -(-seqlen // chunk_size)
    states = torch.randn(batch, nchunks, nheads, dim, generator=gen)
    dA_last = -torch.rand(batch, nheads, nchunks, generator=gen) * 2.0
    seq_idx = packed_seq_idx(batch, seqlen, mean_len, gen)
    return states.to(device), dA_last.to(device), seq_idx.to(device)


def relative_error(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check(device):
    """Largest relative error of out, du, ddA_last against the float64 loop, over several
    shapes (chunk counts below, at and above a tile, a partial last chunk, sequences longer and
    shorter than a chunk). On a GPU also against mamba_ssm's kernels."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    cases = [(1, 40, 8, 2, 64, 6), (2, 300, 16, 3, 96, 30), (2, 1000, 8, 2, 64, 5), (1, 2600, 16, 2, 128, 900)]
    for batch, seqlen, chunk_size, nheads, dim, mean_len in cases:
        states, dA_last, seq_idx = random_inputs(batch, seqlen, chunk_size, nheads, dim, mean_len, device, gen)
        dout = torch.randn(states.shape, generator=gen).to(device)
        s64 = states.double().cpu().requires_grad_()
        a64 = dA_last.double().cpu().requires_grad_()
        ref = reference(s64, a64, seq_idx.cpu(), chunk_size)
        ref.backward(dout.double().cpu())
        out = state_passing_fwd(states, dA_last, seq_idx, chunk_size)
        du, ddA = state_passing_bwd(out, dA_last, dout, seq_idx, chunk_size, torch.float32)
        errors = dict(out=relative_error(out.cpu(), ref), du=relative_error(du.cpu(), s64.grad),
                      ddA=relative_error(ddA.cpu(), a64.grad))
        if device == "cuda":
            errors.update(mamba_comparison(states, dA_last, seq_idx, chunk_size, dout, out, du, ddA))
        print(f"b={batch} l={seqlen} chunk={chunk_size} h={nheads} dim={dim}: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        worst = max(worst, *errors.values())
    print(f"state passing vs float64 loop: largest relative error {worst:.2e}")
    return worst


def _mamba():
    from ssd4rec.ops.ssd_scan import _load_triton_scan

    fn, reason = _load_triton_scan()
    if fn is None:
        sys.exit(f"mamba_ssm's Triton scan is not importable: {reason}")
    return sys.modules["mamba_ssm.ops.triton.ssd_state_passing"]


def mamba_comparison(states, dA_last, seq_idx, chunk_size, dout, out, du, ddA):
    m = _mamba()
    theirs, _ = m._state_passing_fwd(states, dA_last, seq_idx=seq_idx, chunk_size=chunk_size)
    their_du, their_ddA, _ = m._state_passing_bwd(theirs, dA_last, dout, seq_idx=seq_idx, has_initial_states=False,
                                                  dstates_dtype=torch.float32, chunk_size=chunk_size)
    return {"out vs mamba": relative_error(out, theirs), "du vs mamba": relative_error(du, their_du),
            "ddA vs mamba": relative_error(ddA, their_ddA)}


def bench(args):
    m = _mamba()
    gen = torch.Generator().manual_seed(0)
    states, dA_last, seq_idx = random_inputs(2, args.tokens, args.chunk_size, 32, 16 * 64, args.mean_len, "cuda", gen)
    dout = torch.randn(states.shape, generator=gen).cuda()
    dtype = torch.bfloat16
    runs = {
        "ours fwd": lambda: state_passing_fwd(states, dA_last, seq_idx, args.chunk_size),
        "mamba fwd": lambda: m._state_passing_fwd(states, dA_last, seq_idx=seq_idx, chunk_size=args.chunk_size),
        "ours bwd": lambda: state_passing_bwd(states, dA_last, dout, seq_idx, args.chunk_size, dtype),
        "mamba bwd": lambda: m._state_passing_bwd(states, dA_last, dout, seq_idx=seq_idx, has_initial_states=False,
                                                  dstates_dtype=dtype, chunk_size=args.chunk_size),
    }
    for fn in runs.values():  # compile and autotune
        for _ in range(3):
            fn()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end) / 10)
    print(f"{torch.cuda.get_device_name()}: 2 rows x {args.tokens} tokens, chunk {args.chunk_size}, "
          f"{states.shape[1]} chunks, 32 heads x 1024 channels; median ms of {args.repeats} rounds of 10 calls")
    for name, ts in times.items():
        print(f"  {name}: {statistics.median(ts):.3f} ms")
    for part in ("fwd", "bwd"):
        ratio = statistics.median(times[f"ours {part}"]) / statistics.median(times[f"mamba {part}"])
        print(f"  {part}: ours / mamba_ssm = {ratio:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="against the float64 loop (and mamba_ssm on a GPU)")
    parser.add_argument("--tokens", type=int, default=122_880, help="tokens per row (bench)")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--mean-len", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.check:
        worst = check(device)
        sys.exit(0 if worst < TOLERANCE else f"largest relative error {worst:.2e} >= {TOLERANCE}")
    if device != "cuda":
        sys.exit("timing needs a GPU; on a CPU use --check")
    bench(args)


if __name__ == "__main__":
    main()
