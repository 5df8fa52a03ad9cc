"""Cross-entropy over vocab-parallel logits, never materialising the full vocabulary on one rank.

Each TP rank holds logits [b, s, V/t] for its slice of the vocabulary. Three all-reduces over the TP
group give the loss: the max (for a stable exponent), the target's logit (owned by one rank) and the
sum of exponentials. The backward is softmax − one-hot, computed locally on each slice. All math in
fp32. Matches ``torch.nn.functional.cross_entropy`` on the gathered logits, label smoothing and
``ignore_index`` included.

Memory: the fp32 logits are the largest activation of a GPT step ([b, s, V/t]: 4 GiB for 8k tokens
of a 128k vocabulary). The forward shifts, exponentiates and normalises one fp32 tensor in place,
and the backward turns that softmax into the gradient in place, so the whole loss costs one
[b, s, V/t] fp32 buffer: a copy of the logits, or, with ``overwrite_logits`` (the model's own
call: nothing else reads its logits), the logits themselves, as Megatron's does. bf16/fp16 logits
are always copied (to fp32).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel.collectives import TPGroup, all_reduce


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, tp, label_smoothing, ignore_index, overwrite_logits):
        ctx.dtype = logits.dtype
        overwrite = overwrite_logits or logits.dtype != torch.float32  # .float() copies those anyway
        logits = logits.float()
        vocab_local = logits.shape[-1]
        vocab_total = vocab_local * tp.size
        start = tp.rank * vocab_local

        logits_max = all_reduce(logits.amax(dim=-1), tp, dist.ReduceOp.MAX)[0]
        shifted = logits.sub_(logits_max.unsqueeze(-1)) if overwrite else logits - logits_max.unsqueeze(-1)

        ignored = labels == ignore_index
        local_labels = labels - start
        owned = (local_labels >= 0) & (local_labels < vocab_local) & ~ignored
        index = local_labels.masked_fill(~owned, 0).unsqueeze(-1)
        target_logit = shifted.gather(-1, index).squeeze(-1).masked_fill(~owned, 0.0)
        target_logit = all_reduce(target_logit, tp)[0]

        if label_smoothing > 0.0:
            # −mean over the vocabulary of log p_j = log Σexp − mean_j(shifted_j).
            mean_logit = all_reduce(shifted.sum(dim=-1), tp)[0] / vocab_total
        exp = shifted.exp_()
        sum_exp = all_reduce(exp.sum(dim=-1), tp)[0]
        log_sum_exp = sum_exp.log()
        loss = log_sum_exp - target_logit
        if label_smoothing > 0.0:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (log_sum_exp - mean_logit)
        loss = loss.masked_fill(ignored, 0.0)

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, index, owned, ignored)
        ctx.label_smoothing, ctx.vocab_total = label_smoothing, vocab_total
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, index, owned, ignored = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = softmax
        if eps > 0.0:
            grad.sub_(eps / ctx.vocab_total)
        grad.scatter_add_(-1, index, -(1.0 - eps) * owned.unsqueeze(-1).to(grad.dtype))
        grad.mul_((grad_loss * ~ignored).unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tp: TPGroup,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    overwrite_logits: bool = False,
) -> torch.Tensor:
    """Per-token loss [b, s] (fp32) from this rank's logits [b, s, V/t] and the labels [b, s]
    (the same on every TP rank). Positions whose label is ``ignore_index`` get loss 0 and no gradient.
    ``overwrite_logits``: fp32 logits are used as the loss's scratch buffer and hold garbage after the
    call (saves one [b, s, V/t] fp32 tensor); only for logits nothing else reads.
    """
    return _VocabParallelCrossEntropy.apply(logits, labels, tp, label_smoothing, ignore_index, overwrite_logits)
