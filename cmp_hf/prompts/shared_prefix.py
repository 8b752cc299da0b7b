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
little. Layer norms, projections and MLPs run on all suffix tokens packed without padding (one call per layer);
only attention goes bucket by bucket, through ``scaled_dot_product_attention``. In the last layer only the pooled
rows need attention queries, the MLP and the final layer norm.

Everything uses the CLIP layers' own modules (layer norms, q/k/v/out projections, MLP, final layer norm). Where the
text tower is not the structure this relies on (another layer class, hooks on its modules, attention dropout in
training), :func:`shared_prefix_unsupported` says why and the learner falls back to Hugging Face's forward, with
one log line.

With activation checkpointing on, the suffixes run bucket by bucket (each cut into chunks of at most
``chunk_classes`` classes), each under ``torch.utils.checkpoint``: only the prefix's keys/values and each class's
pooled feature stay in memory, and the backward recomputes one group at a time.
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
class SuffixBucket:
    """Classes of one length bucket inside a :class:`SuffixChunk`, laid out for attention: ``rows`` (size x
    length) picks each class's tokens from the chunk's packed tokens, padded with the class's last token (which
    the mask hides); ``mask``/``pooled_mask``: which prefix + suffix keys the (all / pooled) query rows see."""

    size: int
    length: int
    rows: torch.Tensor
    mask: torch.Tensor
    pooled_mask: torch.Tensor


@dataclass
class SuffixChunk:
    """Class suffixes that run through the layers together, packed without padding: ``ids``/``positions`` per
    token (classes one after another), ``buckets`` for attention, ``unpad`` (the packed tokens' rows in the
    buckets' padded outputs, concatenated), ``pooled`` (each class's pooled token in the packed tokens)."""

    ids: torch.Tensor
    positions: torch.Tensor
    buckets: list[SuffixBucket]
    unpad: torch.Tensor
    pooled: torch.Tensor


@dataclass
class SharedPrefixPlan:
    """How the class prompts split into one shared prefix and per-class suffixes, grouped by length.

    ``prefix_ids``/``prefix_index``: the ``1 + M`` shared positions (token ids; context vector per position, -1:
    none). ``groups``: (first, end, length) ranges of the classes, sorted by suffix length (tokens after the
    prefix up to the pooled one), that share a length bucket. ``chunks``: the groups that run through the layers
    together (all of them; one group each with activation checkpointing). ``restore``: sorted position of each
    class in label order.
    """

    prefix_ids: torch.Tensor
    prefix_index: torch.Tensor
    groups: list[tuple[int, int, int]]
    chunks: list[SuffixChunk]
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
    tokens: PromptTokens, eos_token_id: int, checkpointed: bool = False, chunk_classes: int | None = None
) -> SharedPrefixPlan | None:
    """The shared-prefix split of ``tokens``, or ``None`` where the prompts share no prefix holding every context
    position (class-specific contexts, class name in the middle or front): those keep the full forward.
    ``checkpointed``: one chunk per length bucket, cut into at most ``chunk_classes`` classes each."""
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
        step = (chunk_classes if checkpointed else None) or end - first
        groups += [(start, min(start + step, end), upper) for start in range(first, end, step)]
        first = end
    suffixes = [ids[c, length : length + n] for c, n in zip(order, sorted_lengths, strict=True)]
    chunk_groups = [[group] for group in groups] if checkpointed else [groups]
    chunks = [_suffix_chunk(suffixes, chunk, length) for chunk in chunk_groups]
    order_t = torch.tensor(order, device=ids.device)
    return SharedPrefixPlan(
        prefix_ids=ids[0, :length],
        prefix_index=index[0, :length],
        groups=groups,
        chunks=chunks,
        restore=torch.argsort(order_t),
    )


def _suffix_chunk(suffixes: list[torch.Tensor], groups: list[tuple[int, int, int]], n_prefix: int) -> SuffixChunk:
    """The packed layout of the classes in ``groups`` (their ``suffixes``: token ids up to the pooled token)."""
    classes = suffixes[groups[0][0] : groups[-1][1]]
    device = classes[0].device
    lengths = torch.tensor([len(x) for x in classes], device=device)
    starts = lengths.cumsum(0) - lengths  # each class's first packed token
    buckets, unpad, padded_rows = [], [], 0
    for first, end, length in groups:
        first, end = first - groups[0][0], end - groups[0][0]
        steps = torch.arange(length, device=device)
        last = lengths[first:end, None] - 1
        rows = starts[first:end, None] + torch.minimum(steps, last)  # padded with the class's last token
        mask = torch.ones(length, n_prefix + length, dtype=torch.bool, device=device)
        mask[:, n_prefix:] = steps <= steps[:, None]  # causal within the suffix
        pooled_mask = torch.ones(end - first, 1, 1, n_prefix + length, dtype=torch.bool, device=device)
        pooled_mask[:, 0, 0, n_prefix:] = steps <= last
        buckets.append(SuffixBucket(end - first, length, rows.flatten(), mask[None, None], pooled_mask))
        unpad.append(padded_rows + (torch.arange(end - first, device=device)[:, None] * length + steps)[steps <= last])
        padded_rows += (end - first) * length
    ids = torch.cat(classes)
    positions = n_prefix + torch.cat([torch.arange(len(x), device=device) for x in classes])
    return SuffixChunk(ids, positions, buckets, torch.cat(unpad), starts + lengths - 1)


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
    attn: CLIPAttention,
    prefix: tuple[torch.Tensor, torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Attention of one bucket's suffix queries (B, G, Lq, width) over the shared prefix's keys/values (B, heads,
    L_p, head_dim), which every class sees whole, and their own suffix's keys and values (B, G, L, width), as
    ``mask`` ((1, 1, Lq, L_p + L) for all, or (G, 1, Lq, L_p + L) per class) allows, through one
    ``scaled_dot_product_attention`` call over all B x G prompts: its fused kernel (fp32 accumulation, a backward
    that keeps no score matrices) beats per-class score products by far; the price is a copy of the prefix
    keys/values per prompt, the size the full forward holds anyway. Returns (B, G x Lq, width)."""
    batch, groups, queries, width = query.shape
    prefix_key, prefix_value = prefix
    heads, n_prefix, dim = prefix_key.shape[1:]
    prompts = batch * groups

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, G, T, width) -> (B * G, heads, T, head_dim)
        return x.reshape(prompts, x.shape[2], heads, dim).transpose(1, 2)

    def with_prefix(prefix_part: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        shared = (
            prefix_part[:, None].expand(batch, groups, heads, n_prefix, dim).reshape(prompts, heads, n_prefix, dim)
        )
        return torch.cat([shared, split(own)], dim=2)

    if mask.shape[0] > 1:
        mask = mask.repeat(batch, 1, 1, 1)
    out = F.scaled_dot_product_attention(
        split(query), with_prefix(prefix_key, key), with_prefix(prefix_value, value), attn_mask=mask, scale=attn.scale
    )
    return out.transpose(1, 2).reshape(batch, groups * queries, width)


def _bucketed_attention(
    attn: CLIPAttention,
    prefix: tuple[torch.Tensor, torch.Tensor],
    chunk: SuffixChunk,
    last: bool,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> torch.Tensor:
    """Attention outputs (B, T, width) of the packed suffix tokens (B, T, width) of ``chunk``, bucket by bucket
    (``last``: ``query`` holds the pooled rows only, and so does the output). Run under checkpointing, so that the
    backward keeps the packed q/k/v instead of the padded per-bucket copies with the prefix's keys/values (most
    of the activation memory otherwise) and recomputes those: a few per cent of a step."""
    outs, first = [], 0
    for bucket in chunk.buckets:
        if last:
            bucket_query = query[:, first : first + bucket.size, None]
            first += bucket.size
        else:
            bucket_query = query[:, bucket.rows].unflatten(1, (bucket.size, bucket.length))
        bucket_key, bucket_value = (y[:, bucket.rows].unflatten(1, (bucket.size, bucket.length)) for y in (key, value))
        mask = bucket.pooled_mask if last else bucket.mask
        outs.append(_attend(attn, prefix, bucket_query, bucket_key, bucket_value, mask))
    out = torch.cat(outs, dim=1)
    return out if last else out[:, chunk.unpad]


def _suffix_features(
    text_model: CLIPTextModel, prefix: list[tuple[torch.Tensor, torch.Tensor]], chunk: SuffixChunk
) -> torch.Tensor:
    """Final-layer-normed pooled states (B, G, width) of the G class suffixes of ``chunk`` after the prefix whose
    keys/values are ``prefix``. Layer norms, projections and MLPs run on the packed tokens (no padding, one call
    per layer); attention runs per length bucket. In the last layer only the pooled rows get queries and MLP."""
    embeddings, layers = text_model.embeddings, text_model.encoder.layers
    batch = prefix[0][0].shape[0]
    hidden = embeddings.token_embedding(chunk.ids) + embeddings.position_embedding(chunk.positions)
    hidden = hidden.expand(batch, -1, -1)  # (B, T, width)
    for i, layer in enumerate(layers):
        attn, last = layer.self_attn, i == len(layers) - 1
        x = layer.layer_norm1(hidden)
        query = attn.q_proj(x[:, chunk.pooled] if last else x)
        args = (attn, prefix[i], chunk, last, query, attn.k_proj(x), attn.v_proj(x))
        if torch.is_grad_enabled():  # keep the packed q/k/v, not the per-bucket copies with the prefix's
            out = checkpoint(_bucketed_attention, *args, use_reentrant=False)
        else:
            out = _bucketed_attention(*args)
        if last:
            hidden = hidden[:, chunk.pooled]
        hidden = hidden + attn.out_proj(out)
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return text_model.final_layer_norm(hidden)


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
    for chunk in plan.chunks:
        if checkpointed and torch.is_grad_enabled():
            features.append(checkpoint(_suffix_features, text_model, prefix, chunk, use_reentrant=False))
        else:
            features.append(_suffix_features(text_model, prefix, chunk))
    return torch.cat(features, dim=1)[:, plan.restore]
