"""Next-item losses for training on every position of a history at once.

With a target at every token, a batch holds T = sum of history lengths targets (256 histories
of 2,000 items: 512,000), so the (T, n_items) logits of a full softmax would take 20 GB at
10,000 items. Two losses avoid that:

- ``sampled_bce_loss``: SASRec's objective (Kang & McAuley, ICDM 2018): per position the
  target against one item drawn uniformly from the other items,
  -log sigmoid(h . e_target) - log(1 - sigmoid(h . e_negative)). O(T d) memory.
- ``chunked_cross_entropy``: cross-entropy over all items, exact, computed over blocks of
  tokens; backward recomputes each block's logits instead of keeping them, so memory is
  O(T d + block x n_items).
"""

import torch
import torch.nn.functional as F

# Logit elements per block of the chunked cross-entropy (2**25 float32 = 128 MiB).
_CE_BLOCK_ELEMENTS = 2 ** 25


def sample_negatives(targets, n_items, generator=None):
    """One item per target, uniform over the items 1 .. n_items-1 other than the target (item 0
    is padding). targets: (T,) in 1 .. n_items-1 -> (T,)."""
    if n_items < 3:
        raise ValueError(f"negative sampling needs at least 2 real items, got n_items={n_items}")
    neg = torch.randint(1, n_items - 1, targets.shape, device=targets.device, generator=generator)
    return neg + (neg >= targets).long()  # skip the target: uniform over the n_items-2 others


def sampled_bce_loss(hidden, item_weight, targets, negatives):
    """hidden: (T, d), item_weight: (n_items, d), targets, negatives: (T,) -> summed loss (scalar)."""
    pos = (hidden * item_weight[targets]).sum(-1).float()
    neg = (hidden * item_weight[negatives]).sum(-1).float()
    return (F.softplus(-pos) + F.softplus(neg)).sum()  # -log sig(pos) - log(1 - sig(neg))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum_t [logsumexp(h_t W^T) - h_t . W_{y_t}], logits built block by block in float32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, block):
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, W = hidden.float(), weight.float()
            lse = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
            for t0 in range(0, h.shape[0], block):
                lse[t0:t0 + block] = torch.logsumexp(h[t0:t0 + block] @ W.T, dim=-1)
            target_logit = (h * W[targets]).sum(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.block = block
        return (lse - target_logit).sum()

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            h, W = hidden.float(), weight.float()
            g_h = torch.empty_like(h)
            g_W = torch.zeros_like(W)
            for t0 in range(0, h.shape[0], ctx.block):
                hb = h[t0:t0 + ctx.block]
                p = torch.exp(hb @ W.T - lse[t0:t0 + ctx.block, None])  # softmax: (block, n_items)
                p[torch.arange(hb.shape[0], device=p.device), targets[t0:t0 + ctx.block]] -= 1.0
                p *= grad
                g_h[t0:t0 + ctx.block] = p @ W
                g_W += p.T @ hb
        return g_h.to(hidden.dtype), g_W.to(weight.dtype), None, None


def chunked_cross_entropy(hidden, item_weight, targets):
    """hidden: (T, d), item_weight: (n_items, d), targets: (T,) -> summed cross-entropy (scalar)."""
    block = max(1, _CE_BLOCK_ELEMENTS // item_weight.shape[0])
    return _ChunkedCrossEntropy.apply(hidden, item_weight, targets, block)
