"""The training step as CUDA graphs: each step's kernels replayed from one launch.

Why: on an H100 the SSD4Rec step's kernels take about 18 ms, while the host takes 22 to
27 ms to launch them (eager autograd, the Python of the scans' autograd Functions, a few
hundred small launches), so the host paces the step. A CUDA graph replays a captured
step's kernels without any of that Python.

A graph has fixed shapes, and a packed batch's token count T changes with every batch.
So every batch gets one more sample, a padding sequence, that brings its tokens up to a
bucket size (``bucket_tokens``: a multiple of a step that grows with T, so at most 1/64
of the tokens are padding), and a row weight of 0 in the loss. The padding is a
sequence of its own: the scans and the convolution never carry anything across a
sequence boundary (the packing's guarantee, tested), and its weight-0 loss row sends
no gradient back, so the real rows' loss and gradients are those of the unpadded
batch (``tests/test_graph_step.py`` checks that on CPU, ``tests/test_gpu.py`` the
graphed step against the eager one).

One graph per bucket holds the forward pass, the backward pass, gradient clipping and
the optimizer step; the graphs share one memory pool, since they never run at once,
and read their batch from one set of static input buffers. Batches of another size
than the loader's (an epoch's last), and new buckets once ``max_graphs`` are captured,
run eagerly. The model supplies the padding sample (``padding_row``) and honours the
row weights (``ROW_WEIGHT_FIELD``); the optimizer must be capturable (fused Adam is).

With several processes the gradients live in one flat buffer (``gradients``, a
ssd4rec.gradient_sync.FlatGradients) whose all-reduce each graph holds, between the
backward pass and clipping: the module there says why DDP's reducer cannot serve.
"""

import os
import warnings

import torch
from recbole.data.interaction import Interaction
from torch.nn.utils import clip_grad_norm_

from ssd4rec.data.packing import HOST_TOTAL_TOKENS, ROW_WEIGHT_FIELD, host_total_tokens

# The bucket step is the largest power of two <= T / PAD_DIVISOR (at least MIN_STEP), so
# padding costs at most 1/PAD_DIVISOR of a batch's tokens (half that on average).
PAD_DIVISOR = 64
MIN_STEP = 256
# Buckets met in 3 shuffled epochs at batch 1024 (scripts/graph_buckets.py on the real copies):
# ML-1M 18 (histories <= 200) and 25 (whole), Beauty 13, Video Games 30; with the pool shared
# and allocations rounded, one more graph costs its capture and next to no memory.
MAX_GRAPHS = 64


# Every bucket's capture allocates tensors a little larger or smaller than the last one's,
# and the caching allocator, which fits blocks by size, could not reuse the pool's blocks for
# larger ones: on the H100, ML-1M bf16, the memory held grew as captures went on, from 5.7 to
# 11.5 GiB over 15 buckets. Rounding allocations up to quarters of a power of two lets them
# share blocks: 6.3 GiB after all 15, the step as fast (19.1 and 19.2 against 19.0 ms).
# results/MEASUREMENTS.md, session 19.
ALLOCATOR_SETTINGS = "roundup_power2_divisions:4"


def round_allocations():
    """Set ALLOCATOR_SETTINGS on the CUDA caching allocator, unless PYTORCH_CUDA_ALLOC_CONF
    already sets how it behaves (the user's choice wins)."""
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF"):
        return
    # torch has no public call for this, and the private one has moved between releases
    # (torch 2.13 deprecates torch.cuda.memory's in favour of torch._C's).
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None:
        warnings.warn("graph_step: cannot set the CUDA allocator's settings in this torch; set "
                      f"PYTORCH_CUDA_ALLOC_CONF={ALLOCATOR_SETTINGS} to keep the graphs' memory down")
        return
    setter(ALLOCATOR_SETTINGS)


def bucket_tokens(tokens):
    """The padded token count of a batch of ``tokens`` tokens: the next multiple of its
    step strictly above ``tokens``, so the padding sequence has at least one token."""
    step = max(MIN_STEP, 1 << max(0, (tokens // PAD_DIVISOR).bit_length() - 1))
    return (tokens // step + 1) * step


class GraphedSteps:
    """Training steps of one model and optimizer, replayed from CUDA graphs by bucket.

    model:      a module with ``calculate_loss(interaction)`` honouring ROW_WEIGHT_FIELD
                and ``padding_row(tokens)`` (the fields of a padding sample, or None
                when it cannot pad that many)
    optimizer:  built with ``capturable=True``
    amp_dtype:  the autocast dtype of the loss, or None
    clip_grad_norm: RecBole's clip_grad_norm dict, or None
    max_graphs: the most buckets captured; batches of other buckets run eagerly
    rows:       the batch size to graph (the loader's); None takes the first batch's
    gradients:  a FlatGradients to average over the processes after each backward pass, or
                None (one process: the graph's backward pass makes the gradients)
    """

    def __init__(self, model, optimizer, amp_dtype=None, clip_grad_norm=None, max_graphs=MAX_GRAPHS, rows=None,
                 gradients=None):
        self.model = model
        self.optimizer = optimizer
        self.amp_dtype = amp_dtype
        self.clip_grad_norm = clip_grad_norm
        self.max_graphs = max_graphs
        self.gradients = gradients
        self.device = next(model.parameters()).device
        if self.device.type == "cuda":
            round_allocations()
        self.graphs = {}  # padded token count -> torch.cuda.CUDAGraph
        self.pool = None  # the memory pool the graphs share
        self.rows = rows  # batch size of the graphed batches (None: the first batch's)
        self.inputs = None  # Interaction of static (rows + 1,) buffers; the last row pads
        self.fingerprint = None  # what the graphs captured (see _fingerprint)
        self.stream = None  # a CUDA stream for warm-ups and captures
        # The sum of the graphed steps' losses (float64), read by the trainer per epoch.
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        # Counts read by benchmarks, to show the graphs took the epoch: graphed steps, and
        # batches after the first left to the eager step (an epoch's last, a bucket too many).
        self.replays = 0
        self.eager = 0
        # (bucket, GiB the allocator held after its capture), in capture order
        self.capture_memory = []

    def begin_epoch(self):
        """Zero the loss sum; drop the graphs if the parameters, the optimizer's state
        tensors, its hyperparameters or the autocast dtype changed since they were captured
        (a resumed checkpoint, a new learning rate), since a graph would still use the old."""
        self.loss_sum.zero_()
        if self.graphs and self._fingerprint() != self.fingerprint:
            self.graphs, self.pool, self.fingerprint = {}, None, None

    def step(self, interaction):
        """Train on ``interaction`` (on the device) through a graph; False, having done
        nothing, when this batch must take the eager step instead."""
        if not self.model.training or (not self.graphs and not self._optimizer_ready()):
            return False  # the first eager step creates the optimizer's state
        bucket = self.fill(interaction)
        if bucket is None or (bucket not in self.graphs and len(self.graphs) >= self.max_graphs):
            self.eager += 1
            return False
        graph = self.graphs.get(bucket)
        if graph is None:
            graph = self.graphs[bucket] = self._capture(bucket)
        graph.replay()
        self.replays += 1
        return True

    def fill(self, interaction):
        """Copy a batch, and the padding row that brings it to its bucket, into the static
        inputs (``self.inputs``, whose HOST_TOTAL_TOKENS is set to the bucket); returns the
        bucket, or None (nothing copied) for a batch the graphs cannot take: no host-side
        token count, another size than ``rows``, or no padding row."""
        tokens = host_total_tokens(interaction)
        if tokens is None:
            return None
        if self.rows is None:
            self.rows = len(interaction)
        bucket = bucket_tokens(tokens)
        padding = self.model.padding_row(bucket - tokens)
        if len(interaction) != self.rows or padding is None:
            return None
        if self.inputs is None:
            buffers = {field: torch.empty(self.rows + 1, dtype=interaction[field].dtype, device=self.device)
                       for field in padding}
            weight = torch.ones(self.rows + 1, dtype=torch.float32, device=self.device)
            weight[-1] = 0
            self.inputs = Interaction({**buffers, ROW_WEIGHT_FIELD: weight})
        for field, value in padding.items():
            buffer = self.inputs[field]
            buffer[:-1].copy_(interaction[field], non_blocking=True)
            buffer[-1].fill_(value)
        setattr(self.inputs, HOST_TOTAL_TOKENS, bucket)
        return bucket

    def _loss(self):
        if self.amp_dtype is None:
            return self.model.calculate_loss(self.inputs)
        # No autocast cache in a capture: a cached cast would outlive the graph's pool.
        with torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False):
            return self.model.calculate_loss(self.inputs)

    def _capture(self, bucket):
        """Warm up one forward and backward pass on the filled inputs, then capture the step.

        The warm-up runs on the capture stream so that everything a first call sets up
        (torch.compile's code for a new shape, Triton's autotuning, cuBLAS's workspace
        for the stream) is done before capture; its gradients are thrown away and no
        optimizer step is taken, and the CUDA random state is put back after it (its dropout
        masks and item masking drew from it), so training is unchanged: every step, graphed or
        eager, draws where it would have drawn without graphs, and a resumed run, which captures
        its graphs in other epochs than the run it resumes, draws the same numbers. Capturing
        runs no kernel and draws nothing."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        self._zero_grad()
        random_state = torch.cuda.get_rng_state(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._loss().backward()  # no all-reduce: these gradients are thrown away
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        torch.cuda.set_rng_state(random_state, self.device)
        # One process: gradients that are None at capture are created by the graph's
        # backward pass, in its pool, and written afresh (not accumulated) at every replay.
        # Several: backward adds into the flat buffer, which the graph zeroes first.
        self._zero_grad()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            if self.gradients is not None:
                self.gradients.buffer.zero_()
            loss = self._loss()
            loss.backward()
            if self.gradients is not None:
                self.gradients.average_()
            if self.clip_grad_norm:
                clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
            self.optimizer.step()
            self.loss_sum += loss.detach().to(torch.float64)
        self._zero_grad()  # one process: eager steps get gradients of their own
        if self.pool is None:
            self.pool = graph.pool()
            self.fingerprint = self._fingerprint()
        self.capture_memory.append((bucket, round(torch.cuda.memory_reserved(self.device) / 2**30, 2)))
        return graph

    def _zero_grad(self):
        if self.gradients is None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.gradients.zero_()

    def _optimizer_ready(self):
        # A state created inside a capture would be re-created (zeroed) at every replay.
        return all(p in self.optimizer.state for group in self.optimizer.param_groups
                   for p in group["params"] if p.requires_grad)

    def _fingerprint(self):
        tensors = [p for group in self.optimizer.param_groups for p in group["params"]]
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        settings = [(k, v) for group in self.optimizer.param_groups for k, v in group.items() if k != "params"]
        return tuple(t.data_ptr() for t in tensors), repr(settings), self.amp_dtype
