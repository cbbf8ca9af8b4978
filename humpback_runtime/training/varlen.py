"""Packed rows without FlashAttention: SDPA example by example (`attn_implementation` "sdpa_varlen").

Padding-free packing puts the examples of a micro-batch into one row. FlashAttention-2 attends
within each example (its varlen kernels take the example boundaries). Plain SDPA cannot: transformers
gives it one dense block-diagonal mask over the whole row, so it computes the scores of every pair
of tokens in the row, most of them masked out (8 examples of 300 tokens: 2,400^2 scores where the
examples need 8 x 300^2), and on CPU a packed batch was slower than a padded one. This attention
function cuts the row at the example boundaries that the flattening collator passes along
(`cu_seq_lens_q`, as for FlashAttention) and runs causal SDPA on each example: the attention cost
of padded batches, without their padding. The result equals SDPA's with the block-diagonal mask.

`register_varlen()` makes the name known to transformers (the attention function, and a mask function
that builds no mask for a packed row and SDPA's for a padded batch); the trainer calls it before
loading a model with that implementation. The name is not saved with the model (config.json has no
attention implementation), so nothing downstream needs this module.
"""

from __future__ import annotations

from typing import Any

VARLEN = "sdpa_varlen"


def varlen_sdpa_forward(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                        scaling: float | None = None, cu_seq_lens_q: Any = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function interface: query (1, heads, tokens, dim), key and value
    (1, kv heads, tokens, dim); returns (1, tokens, heads, dim)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1 or attention_mask is not None:
        # Not a packed row (generation, a padded batch): SDPA as usual.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    bounds = cu_seq_lens_q.tolist()
    outs = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], dropout_p=dropout, scale=scaling,
        is_causal=True, enable_gqa=gqa) for start, end in zip(bounds, bounds[1:]) if end > start]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _mask(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
    if attention_mask is None:
        return None  # a packed row: the boundaries come with the batch, causality is SDPA's is_causal
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)  # a padded batch: SDPA's own mask


def register_varlen() -> str:
    """Make "sdpa_varlen" an `attn_implementation` transformers accepts; returns the name."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_sdpa_forward)
    AttentionMaskInterface.register(VARLEN, _mask)
    return VARLEN
