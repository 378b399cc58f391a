"""The S2 joint loss ``L = L_SL + lambda * (L_SSL_vis + L_SSL_ir)`` around any method.

All images of an S2 batch (the SL pair and the two SSL pairs) go through the network in one
batched forward, part after part (each part's A images, then its B images), with each part's
own batch-norm statistics (:mod:`s2study.part_norm`), so the SL term does not depend on
whether SSL images share the batch; the method's own loss ``L_f`` is then applied to each
part. Methods know nothing about S2; S2 is written once, here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from s2study.data.batch import S2Batch
from s2study.methods.base import DenseFeatures, Method
from s2study.part_norm import part_statistics

SSL_PARTS = ("ssl_vis", "ssl_ir")


def active_parts(batch: S2Batch, lambda_ssl: float) -> dict[str, slice]:
    """The parts that contribute: SSL parts only when ``lambda_ssl > 0`` (at ``lambda_ssl ==
    0`` the SSL images are not forwarded: they could not change the gradient, see
    :func:`s2_loss`, and would only cost time)."""
    return {k: v for k, v in batch.parts.items() if k == "sl" or lambda_ssl > 0}


def s2_loss(
    method: Method, batch: S2Batch, lambda_ssl: float, network: Callable[[Tensor], DenseFeatures] | None = None,
    parts: dict[str, slice] | None = None,
) -> dict[str, Tensor]:
    """Forward the S2 batch once and combine the method's losses.

    Args:
        method: any :class:`Method`.
        batch: images (N, 3, C, C) A and B, flow (N, C, C, 2), valid (N, C, C), and
            ``parts`` naming the slices of the SL and SSL pairs.
        lambda_ssl: weight of the SSL terms.
        network: what runs the forward (default: ``method`` itself; e.g. a compiled ``method``).
        parts: the parts to forward (default :func:`active_parts`); an SSL part forwarded at
            ``lambda_ssl == 0`` leaves the loss, its gradient and the running statistics as
            they are without it.

    Returns:
        ``{"total", "sl", "ssl_vis", "ssl_ir", "sl/<part>", ...}``: scalar tensors; ``total``
        is the joint loss, the others are detached for logging.
    """
    parts = active_parts(batch, lambda_ssl) if parts is None else parts
    names = sorted(parts, key=lambda n: parts[n].start)  # SL first: its statistics are kept
    sizes = [parts[n].stop - parts[n].start for n in names]
    images = torch.cat([im for n in names for im in (batch.images_a[parts[n]], batch.images_b[parts[n]])])
    with part_statistics(method, [2 * s for s in sizes]):
        out = (method if network is None else network)(images)
    chunks = out.split([s for s in sizes for _ in "ab"])  # per part: its A side, then its B side
    terms: dict[str, Tensor] = {}
    logged: dict[str, Tensor] = {}
    for i, name in enumerate(names):
        part = parts[name]
        losses = method.loss(chunks[2 * i], chunks[2 * i + 1], batch.flow[part], batch.valid[part])
        terms[name] = losses["total"]
        logged[name] = losses["total"].detach()
        logged.update({f"{name}/{k}": v.detach() for k, v in losses.items() if k != "total"})
    total = terms["sl"]
    for name in SSL_PARTS:
        if name in terms:
            total = total + lambda_ssl * terms[name]
    return {"total": total, **logged}
