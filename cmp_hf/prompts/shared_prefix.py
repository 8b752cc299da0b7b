"""Class prompts through CLIP's text encoder with their shared prefix computed once: exact, and far cheaper.

CLIP's text encoder is causal and pools the hidden state of one token (EOS). With a context shared by all classes
and the class name at the end (CoOp's default), every prompt starts with the same ``1 + M`` tokens (SOS and the M
context vectors). Causality makes the hidden states of those positions, in every layer, a function of those
positions alone, so they are the same for every class: the prefix runs through the layers once (once per image for
CoCoOp), and keeps each layer's keys and values. Each class's suffix (name tokens, ".", EOS) then runs alone,
attending to the prefix's keys/values and to its own causal past: the same sums as in the full prompt, so the
pooled features and the gradients into the context (which reach it through the prefix keys/values) are the same up
to floating-point rounding. Tokens after the pooled one are never seen by it, so a suffix stops at EOS; suffixes
are grouped into a few length buckets (:data:`~cmp_hf.constants.TEXT_LENGTH_BUCKETS`) so that padding costs
little; in the last layer only the pooled rows need attention queries, the MLP and the final layer norm.

Everything uses the CLIP layers' own modules (layer norms, q/k/v/out projections, MLP, final layer norm). Where the
text tower is not the structure this relies on (another layer class, hooks on its modules, attention dropout in
training), :func:`shared_prefix_unsupported` says why and the learner falls back to Hugging Face's forward, with
one log line.

With activation checkpointing on, each group of classes (a bucket, cut into chunks of at most ``chunk_classes``)
runs under ``torch.utils.checkpoint``: only the prefix's keys/values and each class's pooled feature stay in memory,
and the backward recomputes one group at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.clip.modeling_clip import (
    CLIPAttention,
    CLIPEncoderLayer,
    CLIPTextEmbeddings,
    CLIPTextModel,
)

from ..constants import TEXT_LENGTH_BUCKETS
from .config import PromptTokens

logger = logging.getLogger(__name__)

LEGACY_EOS_TOKEN_ID = 2  # configs from before transformers PR #24773 pool at the largest token id instead


@dataclass
class SharedPrefixPlan:
    """How the class prompts split into one shared prefix and per-class suffixes, grouped by length.

    ``prefix_ids``/``prefix_index``: the ``1 + M`` shared positions (token ids; context vector per position, -1:
    none). ``suffix_ids``: each class's tokens after the prefix up to its pooled token, classes sorted by that
    length, right-padded. ``pooled``: the pooled token's position in its suffix. ``groups``: (first, end, length)
    ranges of the sorted classes that run together. ``restore``: sorted position of each class in label order.
    """

    prefix_ids: torch.Tensor
    prefix_index: torch.Tensor
    suffix_ids: torch.Tensor
    pooled: torch.Tensor
    groups: list[tuple[int, int, int]]
    restore: torch.Tensor


def pooled_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """The token CLIPTextModel pools in each row: the first ``eos_token_id``, or the largest id for legacy
    configs (``eos_token_id == 2``)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return input_ids.argmax(dim=-1)
    return (input_ids == eos_token_id).int().argmax(dim=-1)


def length_buckets(lengths: list[int], max_buckets: int) -> list[int]:
    """Upper lengths of at most ``max_buckets`` buckets that minimise the padded token count of sorted
    ``lengths`` (each length goes to the smallest bucket that holds it): an exact dynamic programme over the
    distinct lengths."""
    values = sorted(set(lengths))
    counts = [lengths.count(v) for v in values]
    n = len(values)
    # best[k][j]: least padded tokens for values[:j] in k buckets; cut[k][j]: where its last bucket starts
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (n + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0
    for k in range(1, max_buckets + 1):
        for j in range(1, n + 1):
            for i in range(j):
                cost = best[k - 1][i] + sum(counts[i:j]) * values[j - 1]
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, max_buckets + 1), key=lambda b: best[b][n])
    uppers, j = [], n
    while j > 0:
        uppers.append(values[j - 1])
        j, k = cut[k][j], k - 1
    return sorted(uppers)


def plan_shared_prefix(
    tokens: PromptTokens, eos_token_id: int, chunk_classes: int | None = None
) -> SharedPrefixPlan | None:
    """The shared-prefix split of ``tokens``, or ``None`` where the prompts share no prefix holding every context
    position (class-specific contexts, class name in the middle or front): those keep the full forward."""
    ids, index = tokens.input_ids, tokens.context_index
    context_positions = (index[0] >= 0).nonzero().flatten()
    if len(context_positions) == 0:
        return None
    length = int(context_positions[-1]) + 1
    if not (
        bool((ids[:, :length] == ids[0, :length]).all())
        and bool((index[:, :length] == index[0, :length]).all())
        and bool((index[:, length:] < 0).all())
    ):
        return None
    pooled = pooled_positions(ids, eos_token_id)
    if bool((pooled < length).any()):
        return None
    suffix_lengths = (pooled - length + 1).tolist()
    order = sorted(range(len(ids)), key=lambda c: suffix_lengths[c])
    sorted_lengths = [suffix_lengths[c] for c in order]
    groups, first = [], 0
    for upper in length_buckets(sorted_lengths, TEXT_LENGTH_BUCKETS):
        end = first
        while end < len(order) and sorted_lengths[end] <= upper:
            end += 1
        step = chunk_classes or end - first
        groups += [(start, min(start + step, end), upper) for start in range(first, end, step)]
        first = end
    order_t = torch.tensor(order, device=ids.device)
    return SharedPrefixPlan(
        prefix_ids=ids[0, :length],
        prefix_index=index[0, :length],
        suffix_ids=ids[order_t, length : length + max(suffix_lengths)],
        pooled=pooled[order_t] - length,
        groups=groups,
        restore=torch.argsort(order_t),
    )


def shared_prefix_unsupported(text_model: nn.Module) -> str | None:
    """Why ``text_model`` cannot take the shared-prefix path (``None``: it can). Checked at each call: hooks may
    come and go."""
    if type(text_model) is not CLIPTextModel or type(text_model.embeddings) is not CLIPTextEmbeddings:
        return f"the text model is a {type(text_model).__name__}, not transformers' CLIPTextModel"
    for layer in text_model.encoder.layers:
        if type(layer) is not CLIPEncoderLayer or type(layer.self_attn) is not CLIPAttention:
            return f"a text layer is a {type(layer).__name__} ({type(layer.self_attn).__name__} attention)"
        if layer.self_attn.dropout and layer.self_attn.training:
            return "the text attention has dropout in training mode"
    for name, module in text_model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks:
            return f"text module {name or 'text_model'!r} has hooks, which the shared-prefix path would bypass"
    return None


def _heads(x: torch.Tensor, attn: CLIPAttention) -> torch.Tensor:
    """(..., T, width) -> (B, heads, ..., T, head_dim), the batch dimension first."""
    x = x.unflatten(-1, (attn.num_heads, attn.head_dim))
    return x.movedim(-2, 1)


def _prefix_keys_values(text_model: CLIPTextModel, embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of the shared prefix (B, L_p, width) in every layer; the prefix's own causal attention
    through ``scaled_dot_product_attention``."""
    layers = text_model.encoder.layers
    hidden = embeds + text_model.embeddings.position_embedding.weight[: embeds.shape[1]]
    keys_values = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        key, value = _heads(attn.k_proj(x), attn), _heads(attn.v_proj(x), attn)
        keys_values.append((key, value))
        if i == len(layers) - 1:  # the last layer's prefix outputs are never pooled
            break
        out = F.scaled_dot_product_attention(
            _heads(attn.q_proj(x), attn), key, value, is_causal=True, scale=attn.scale
        )
        hidden = hidden + attn.out_proj(out.movedim(1, -2).flatten(-2))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return keys_values


def _attend(
    query: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor],
    key: torch.Tensor,
    value: torch.Tensor,
    query_positions: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention of suffix queries (B, H, G, Lq, d), already scaled, over the shared prefix's keys (B, H,
    L_p, d), which every class sees whole, and their own suffix's keys (B, H, G, L, d) up to the query's position.
    The prefix scores are one matrix product for all classes, so the prefix keys/values are never copied per
    class (which attending through ``scaled_dot_product_attention`` would need)."""
    batch, heads, groups, queries, dim = query.shape
    prefix_key, prefix_value = prefix
    flat = query.reshape(batch, heads, groups * queries, dim)
    prefix_scores = (flat @ prefix_key.transpose(-1, -2)).view(batch, heads, groups, queries, -1)
    scores = query @ key.transpose(-1, -2)
    future = torch.arange(key.shape[-2], device=key.device) > query_positions[..., None]  # (G, Lq, L)
    scores = scores.masked_fill(future, float("-inf"))
    scores = torch.cat([prefix_scores, scores], dim=-1)
    # in at least fp32, as Hugging Face's eager attention does
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    n_prefix = prefix_key.shape[-2]
    from_prefix = weights[..., :n_prefix].reshape(batch, heads, groups * queries, n_prefix) @ prefix_value
    out = from_prefix.view(batch, heads, groups, queries, dim) + weights[..., n_prefix:] @ value
    return out.movedim(1, -2).flatten(-2)  # (B, G, Lq, width)


def _suffix_features(
    text_model: CLIPTextModel,
    prefix: list[tuple[torch.Tensor, torch.Tensor]],
    input_ids: torch.Tensor,
    pooled: torch.Tensor,
) -> torch.Tensor:
    """Final-layer-normed pooled states (B, G, width) of G class suffixes ``input_ids`` (G, L) after the prefix
    whose keys/values are ``prefix``."""
    embeddings, layers = text_model.embeddings, text_model.encoder.layers
    batch, n_prefix = prefix[0][0].shape[0], prefix[0][0].shape[-2]
    length = input_ids.shape[1]
    hidden = embeddings.token_embedding(input_ids)
    hidden = hidden + embeddings.position_embedding.weight[n_prefix : n_prefix + length]
    hidden = hidden.expand(batch, -1, -1, -1)  # (B, G, L, width)
    positions = torch.arange(length, device=input_ids.device).expand(len(input_ids), -1)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        x = layer.layer_norm1(hidden)
        key, value = _heads(attn.k_proj(x), attn), _heads(attn.v_proj(x), attn)
        if i == len(layers) - 1:  # only the pooled rows go on
            rows = pooled[None, :, None, None].expand(batch, -1, 1, x.shape[-1])
            hidden, x, positions = hidden.gather(2, rows), x.gather(2, rows), pooled[:, None]
        query = _heads(attn.q_proj(x), attn) * attn.scale
        hidden = hidden + attn.out_proj(_attend(query, prefix[i], key, value, positions))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return text_model.final_layer_norm(hidden[:, :, 0])


def encode_with_shared_prefix(
    text_model: CLIPTextModel,
    plan: SharedPrefixPlan,
    contexts: torch.Tensor,
    checkpointed: bool = False,
) -> torch.Tensor:
    """CLIPTextModel's pooled output (B, C, width) for the C class prompts of ``plan`` with context vectors
    ``contexts`` (B, M, width): one set of prompts per context (CoOp: B = 1; CoCoOp: one per image)."""
    token_embeds = text_model.embeddings.token_embedding(plan.prefix_ids)
    index = plan.prefix_index
    learned = contexts[:, index.clamp(min=0)].to(token_embeds.dtype)
    prefix = _prefix_keys_values(text_model, torch.where((index >= 0)[:, None], learned, token_embeds))
    features = []
    for first, end, length in plan.groups:
        args = (text_model, prefix, plan.suffix_ids[first:end, :length], plan.pooled[first:end])
        if checkpointed and torch.is_grad_enabled():
            features.append(checkpoint(_suffix_features, *args, use_reentrant=False))
        else:
            features.append(_suffix_features(*args))
    return torch.cat(features, dim=1)[:, plan.restore]
