"""Per-part batch-norm statistics for the one batched forward of an S2 batch.

An S2 batch holds the SL pair and, when ``lambda > 0``, the two SSL pairs (noisy, blurred,
gray-inverted, with black warp borders). With plain batch norm every part would be normalised
with the statistics of the whole batch, so the SL images would be normalised differently at
``lambda = 0`` (SL images only) than at ``lambda > 0``: a lambda study would confound the SSL
loss with batch-norm statistics. Inside :func:`part_statistics`, every train-mode batch norm
of a network normalises each part (a run of consecutive batch items) with that part's own
statistics, and updates its running statistics (used at evaluation) from the first part, the
SL pair, only; so the SL term and the running statistics are what they are at ``lambda = 0``.

Methods with batch norm of their own making (R2D2's memory-lean training trunk) read
:func:`group_sizes` and call :func:`grouped_batch_norm_stats`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SIZES: ContextVar[tuple[int, ...] | None] = ContextVar("s2study_part_sizes", default=None)


def group_sizes(batch: int) -> tuple[int, ...] | None:
    """The part sizes in effect for a batch of ``batch`` items (None: normalise it as one)."""
    sizes = _SIZES.get()
    return sizes if sizes is not None and sum(sizes) == batch else None


@contextmanager
def part_statistics(network: nn.Module, sizes: Sequence[int]) -> Iterator[None]:
    """Inside, the batch norms of ``network`` normalise each run of ``sizes`` batch items
    with its own statistics (see the module docstring). One part: nothing changes."""
    if len(sizes) <= 1:
        yield
        return
    token = _SIZES.set(tuple(int(s) for s in sizes))
    patched = []
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and "forward" not in vars(module):
            module.forward = functools.partial(_grouped_forward, module)  # this instance only
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
        _SIZES.reset(token)


def _momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-statistics update factor of one training step, as torch's batch norm uses it."""
    if bn.momentum is not None:
        return bn.momentum
    return 1.0 / float(bn.num_batches_tracked)  # cumulative average (momentum None)


def _grouped_forward(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    sizes = group_sizes(x.shape[0])
    if sizes is None:
        return type(bn).forward(bn, x)
    bn._check_input_dim(x)
    if bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
    out = []
    for i, chunk in enumerate(x.split(sizes)):
        first = i == 0 and bn.track_running_stats
        out.append(F.batch_norm(chunk, bn.running_mean if first else None, bn.running_var if first else None,
                                bn.weight, bn.bias, True, _momentum(bn) if first else 0.0, bn.eps))
    return torch.cat(out)


def grouped_batch_norm_stats(x: Tensor, bn: nn.BatchNorm2d, sizes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Affine-free train-mode batch norm of ``x`` per part: ``(y, invstd)`` with ``invstd``
    of shape (parts, C); the running statistics are updated from the first part only."""
    ys, invstds = [], []
    for i, chunk in enumerate(x.split(list(sizes))):
        first = i == 0
        y, _, invstd = torch.native_batch_norm(chunk, None, None, bn.running_mean if first else None,
                                               bn.running_var if first else None, True,
                                               bn.momentum if first else 0.0, bn.eps)
        ys.append(y)
        invstds.append(invstd)
    return torch.cat(ys), torch.stack(invstds)
