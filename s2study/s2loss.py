"""The S2 joint loss ``L = L_SL + lambda * (L_SSL_vis + L_SSL_ir)`` around any method.

All images of an S2 batch (the SL pair and the two SSL pairs) go through the network in one
batched forward; the method's own loss ``L_f`` is then applied to each part. Methods know
nothing about S2; S2 is written once, here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from s2study.data.batch import S2Batch
from s2study.methods.base import Method

SSL_PARTS = ("ssl_vis", "ssl_ir")


def s2_loss(method: Method, batch: S2Batch, lambda_ssl: float) -> dict[str, Tensor]:
    """Forward the whole S2 batch once and combine the method's losses.

    Args:
        method: any :class:`Method`.
        batch: images (N, 3, C, C) A and B, flow (N, C, C, 2), valid (N, C, C), and
            ``parts`` naming the slices of the SL and SSL pairs.
        lambda_ssl: weight of the SSL terms.

    Returns:
        ``{"total", "sl", "ssl_vis", "ssl_ir", "sl/<part>", ...}``: scalar tensors; ``total``
        is the joint loss, the others are detached for logging.
    """
    n = batch.images_a.shape[0]
    out = method(torch.cat([batch.images_a, batch.images_b]))
    out_a, out_b = out.select(slice(0, n)), out.select(slice(n, 2 * n))
    terms: dict[str, Tensor] = {}
    logged: dict[str, Tensor] = {}
    for name, part in batch.parts.items():
        parts = method.loss(out_a.select(part), out_b.select(part), batch.flow[part], batch.valid[part])
        terms[name] = parts["total"]
        logged[name] = parts["total"].detach()
        logged.update({f"{name}/{k}": v.detach() for k, v in parts.items() if k != "total"})
    total = terms["sl"]
    ssl = [terms[p] for p in SSL_PARTS if p in terms]
    if ssl and lambda_ssl > 0:
        total = total + lambda_ssl * sum(ssl)
    return {"total": total, **logged}
