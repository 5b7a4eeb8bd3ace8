"""Attention in bfloat16 without AMX: rewrite an exported ViT graph's ``scaled_dot_product_attention``.

``unquantized_precision="bfloat16-matmul-attention"`` runs each attention's two matmuls as bfloat16 GEMMs
(what inductor lowers to oneDNN's AVX512-BF16 kernels) instead of aten's flash-attention kernel.
"""

from __future__ import annotations

import torch

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def bfloat16_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       scale: float | None = None) -> torch.Tensor:
    """``softmax(query @ key^T * scale) @ value`` with both matmuls in bfloat16 (float32 accumulation) and
    the softmax in float32, returned in ``query``'s dtype.

    Why not ``scaled_dot_product_attention`` in bfloat16: aten's CPU flash-attention kernel is no faster in
    bfloat16 than in float32 without AMX, while inductor runs these two matmuls as oneDNN bfloat16 GEMMs
    (AVX512-BF16) and fuses the casts and the softmax into one kernel (figures in benchmarks/README.md,
    "The attention in bfloat16 without AMX").
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    # The scale goes on the query (as in timm's unfused attention), not on the 197x197 scores.
    scores = ((query * scale).to(torch.bfloat16) @ key.to(torch.bfloat16).transpose(-2, -1)).float()
    # The softmax written out: inductor's own lowering divides every score by the row's sum, and a division
    # costs several multiplications; one reciprocal per row instead.
    exponentials = (scores - scores.amax(-1, keepdim=True)).exp()
    weights = (exponentials * exponentials.sum(-1, keepdim=True).reciprocal()).to(torch.bfloat16)
    return (weights @ value.to(torch.bfloat16)).to(query.dtype)


def attention_in_bfloat16(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite, in place, each ``scaled_dot_product_attention`` of an exported graph without mask, dropout
    or causal masking (a ViT's) into ``bfloat16_attention``; returns ``graph_module``. Other attention
    calls are left as they are."""
    names = [argument.name for argument in _SDPA._schema.arguments]
    for node in list(graph_module.graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        bound = {**dict(zip(names, node.args)), **node.kwargs}
        if (bound.get("attn_mask") is not None or bound.get("dropout_p", 0.0) or bound.get("is_causal", False)
                or bound.get("enable_gqa", False)):
            continue
        with graph_module.graph.inserting_before(node):
            rewritten = graph_module.graph.call_function(
                bfloat16_attention, (bound["query"], bound["key"], bound["value"]), {"scale": bound.get("scale")})
        rewritten.meta = dict(node.meta)
        node.replace_all_uses_with(rewritten)
        graph_module.graph.erase_node(node)
    graph_module.recompile()
    return graph_module
