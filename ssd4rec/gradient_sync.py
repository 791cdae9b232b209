"""Gradients in one flat buffer, averaged over a run's processes by one all-reduce a step.

Used in place of DDP's reducer when several processes replay CUDA-graphed training steps
(``graph_step``, ssd4rec.graph_step). Each rank decides for itself, batch by batch,
whether a step replays a graph (its batch's bucket was captured) or runs eagerly (a new
bucket, an epoch's smaller last batch), and a rank capturing a graph issues no
collective while it captures. DDP's reducer issues its collectives from autograd hooks,
one per gradient bucket, and arms them in its wrapper's forward, which a graph does not
replay: a rank replaying a graph and a rank stepping eagerly would issue different
collectives and wait on each other for ever. Here every step, graphed or eager, issues
exactly one all-reduce of the same buffer, so the ranks stay in step however each of them
runs a step; a captured graph holds that all-reduce (NCCL collectives can be captured).

Every trainable parameter gets a gradient, zero where the loss does not reach it, as
RecBole's ``sync_grad_loss`` gives each one under DDP; and the mean over the ranks is
DDP's, so each step equals DDP's on the same batches (tests/test_distributed.py).
"""

import torch
import torch.distributed as dist

from ssd4rec.errors import SSD4RecError


class FlatGradients:
    """The gradients of ``parameters`` as views of one buffer.

    parameters: the model's parameters; those with requires_grad are synced, and must
                share one dtype and device (fp32 weights under bf16 autocast do)
    buffer:     (sum of their numel,) every gradient, parameter after parameter
    """

    def __init__(self, parameters):
        self.parameters = [p for p in parameters if p.requires_grad]
        kinds = {(p.dtype, p.device) for p in self.parameters}
        if len(kinds) != 1:
            raise SSD4RecError(f"graph_step with several processes needs the trainable parameters in one "
                               f"dtype on one device, got {sorted(map(str, kinds))}")
        (dtype, device), = kinds
        self.buffer = torch.zeros(sum(p.numel() for p in self.parameters), dtype=dtype, device=device)
        self.views = []
        offset = 0
        for p in self.parameters:
            self.views.append(self.buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.attach()

    def attach(self):
        """Point every parameter's ``.grad`` at its view again (``optimizer.zero_grad()``
        sets them to None). Backward then adds into the views in place."""
        for p, view in zip(self.parameters, self.views):
            if p.grad is not view:
                p.grad = view

    def zero_(self):
        self.attach()
        self.buffer.zero_()

    def average_(self):
        """The buffer summed over the process group's ranks, divided by their count: one
        collective (gloo has no AVG reduction, so the division is a step of its own). Also
        run for a group of one, which the GPU tests use to capture the collective."""
        if not dist.is_initialized():
            return
        dist.all_reduce(self.buffer)
        size = dist.get_world_size()
        if size > 1:
            self.buffer.div_(size)


def broadcast_module(module):
    """Rank 0's parameters and buffers in every rank's ``module``, as DDP's constructor
    copies them: each rank may have initialised its weights from its own seed."""
    if not dist.is_initialized():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)
