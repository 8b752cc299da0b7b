"""Write learned prompt vectors into CLIP's token-embedding output.

No transformers version lets ``CLIPTextModel`` take ``inputs_embeds``, and its EOS pooling needs the real
``input_ids``. A forward hook on ``text_model.embeddings.token_embedding`` that swaps in learned vectors at chosen
positions leaves positions, masks and pooling to Hugging Face's code. The hook is inert outside
:meth:`EmbeddingOverride.replacing`, so other text passed through the same CLIP is never altered.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EmbeddingOverride:
    """Forward hook on an ``nn.Embedding`` that, while active, replaces rows of its output.

    ``index`` has the shape of the token ids fed to the embedding; where ``index >= 0`` the output row becomes
    ``vectors[index]`` (gradients flow to ``vectors``), elsewhere it is the ordinary token embedding.
    """

    def __init__(self, embedding: nn.Embedding) -> None:
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handle = embedding.register_forward_hook(self._hook)

    @contextmanager
    def replacing(self, vectors: torch.Tensor, index: torch.Tensor) -> Iterator[None]:
        self._pending = (vectors, index)
        try:
            yield
        finally:
            self._pending = None

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self._pending is None:
            return None
        vectors, index = self._pending
        if index.shape != output.shape[:-1]:
            raise RuntimeError(
                f"Prompt index of shape {tuple(index.shape)} does not match token ids {output.shape[:-1]}."
            )
        learned = vectors[index.clamp(min=0)].to(output.dtype)
        return torch.where((index >= 0).unsqueeze(-1), learned, output)

    def remove(self) -> None:
        self._handle.remove()
