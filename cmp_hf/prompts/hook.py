"""Write learned prompt vectors into CLIP's token-embedding output, for the duration of one text forward.

No transformers version lets ``CLIPTextModel`` take ``inputs_embeds``, and its EOS pooling needs the real
``input_ids``. A forward hook on ``text_model.embeddings.token_embedding`` that swaps in learned vectors at chosen
positions leaves positions, masks and pooling to Hugging Face's code. The hook exists only inside
:func:`replaced_embeddings`: it is registered on entry and removed on exit, so no prompt ever leaves a hook behind
and other text passed through the same CLIP is never altered. Deep prompts (MaPLe) use the same pattern on the
encoder layers' inputs and the vision embeddings' output (:func:`transformed_layer_inputs`,
:func:`transformed_output`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def replaced_embeddings(embedding: nn.Embedding, vectors: torch.Tensor, index: torch.Tensor) -> Iterator[None]:
    """While active, rows of ``embedding``'s output where ``index >= 0`` become ``vectors[index]`` (gradients flow
    to ``vectors``); elsewhere the output is the ordinary token embedding. ``index`` has the token ids' shape."""

    def replace(output: torch.Tensor) -> torch.Tensor:
        if index.shape != output.shape[:-1]:
            raise RuntimeError(
                f"Prompt index of shape {tuple(index.shape)} does not match token ids {tuple(output.shape[:-1])}."
            )
        learned = vectors[index.clamp(min=0)].to(output.dtype)
        return torch.where((index >= 0).unsqueeze(-1), learned, output)

    with transformed_output(embedding, replace):
        yield


@contextmanager
def transformed_layer_inputs(transforms: dict[nn.Module, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    """While active, each module's input hidden states (its first argument) go through its transform first: deep
    prompts written into a transformer layer's input. Registered on entry, removed on exit, like
    :func:`transformed_output`."""

    def hook(transform: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (transform(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": transform(kwargs["hidden_states"])}

        return pre_hook

    handles = [module.register_forward_pre_hook(hook(fn), with_kwargs=True) for module, fn in transforms.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def transformed_output(module: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While active, ``module``'s output goes through ``transform`` (e.g. prompt tokens appended to embeddings)."""
    handle = module.register_forward_hook(lambda _module, _args, output: transform(output))
    try:
        yield
    finally:
        handle.remove()
