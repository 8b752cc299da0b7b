"""Prompt learners: how class prompts are built and where their learned vectors enter CLIP's text encoder."""

from .coop import PROMPT_CONFIG_NAME, CoOpPromptConfig, PromptTokens, tokenize_prompts, validate_class_names
from .hook import EmbeddingOverride

__all__ = [
    "PROMPT_CONFIG_NAME",
    "CoOpPromptConfig",
    "EmbeddingOverride",
    "PromptTokens",
    "tokenize_prompts",
    "validate_class_names",
]
