"""Prompt text: how class prompts are built and where learned vectors enter CLIP's text encoder."""

from .config import CoOpPromptConfig, PromptConfig, PromptTokens, tokenize_prompts, validate_class_names
from .hook import replaced_embeddings

__all__ = [
    "CoOpPromptConfig",
    "PromptConfig",
    "PromptTokens",
    "replaced_embeddings",
    "tokenize_prompts",
    "validate_class_names",
]
