"""CoOp-style prompts (Zhou et al., IJCV 2022): ``[SOS] ctx_1 .. ctx_M [class tokens] "." [EOS]``.

Every prompt learner (``cmp_hf.learners``) builds its class prompts this way. This module turns a
:class:`PromptConfig` and a tokenizer into token ids plus a map of where each learned context vector goes. The
vectors themselves are owned by peft (see ``cmp_hf.modeling``) and written into the token-embedding output by
:func:`cmp_hf.prompts.hook.replaced_embeddings`, so positions, attention mask and EOS pooling stay Hugging Face's
own code.

Prompts are padded only to the longest prompt of the class list, not to 77 tokens: the text encoder is causal and
pools at EOS, so padding after EOS cannot change the feature, and short prompts are much cheaper.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from ..atomic import write_json
from ..constants import PROMPT_CONFIG_NAME

CLASS_TOKEN_POSITIONS = ("end", "middle", "front")
ClassTokenPosition = Literal["end", "middle", "front"]
# Written into prompt_config.json beside the fields: 2 = saved with prompt_digest.json (weights and settings), which
# is then required on load; a file without the key was saved before digests existed (cmp_hf 0.1).
FORMAT_VERSION_KEY, FORMAT_VERSION = "format_version", 2


@dataclass
class PromptConfig:
    """Everything needed to rebuild a trained prompt of any learner (CoOp's options and each learner's own); saved
    as ``prompt_config.json`` next to the peft adapter.

    Args:
        class_names: one name per class, in label order. Underscores are read as spaces, as CoOp does.
        n_ctx: number M of learned context vectors. Overwritten by the token count of ``ctx_init`` when that is set.
        ctx_init: text whose token embeddings initialise the context (CoOp uses ``"a photo of a"``); ``None`` draws
            the vectors from N(0, 0.02).
        class_token_position: where the class name goes relative to the context: ``"end"`` (CoOp's default),
            ``"middle"`` (between the two halves of the context) or ``"front"``.
        class_specific_context: one context per class (CoOp's CSC) instead of one shared by all classes.
        template: text around the class name, ``"{}"`` standing for it. Text before ``"{}"`` stays attached to the
            name, text after it ends the prompt. CoOp's prompt is ``"{}."``.
        base_model_name_or_path: the CLIP the prompt was learned on (Hub id or directory), used to load it back.
        learner: the prompt learner that uses this prompt, a key of ``cmp_hf.learners.LEARNERS`` (``"coop"``: a
            fixed context; ``"cocoop"``: an image-conditional one; ``"maple"``: deep prompts in both towers;
            ``"proda"``: K contexts whose class features form a Gaussian). The learner checks the options it
            cannot take.
        maple_prompt_depth: MaPLe's prompt depth J: the text context and the vision prompts enter layers 0..J-1
            (capped by the towers' depth). Other learners ignore it.
        proda_num_prompts: ProDA's number K of contexts. Other learners ignore it.
        learner_options: options that belong to the learner alone, by name (a learner declares them with their
            defaults in ``PromptLearner.options`` and checks them; unset names take its defaults), so that a new
            learner needs no field here. Learners without such options take none.
        allow_duplicate_names: accept repeated class names. Off by default (a repeat is nearly always a mistake
            and makes two classes indistinguishable); CLIP's and CoOp's ImageNet names repeat "missile" and
            "sunglasses", so reproducing ImageNet needs it on.
    """

    class_names: list[str] = field(default_factory=list)
    n_ctx: int = 16
    ctx_init: str | None = None
    class_token_position: ClassTokenPosition = "end"
    class_specific_context: bool = False
    template: str = "{}."
    base_model_name_or_path: str | None = None
    learner: str = "coop"
    allow_duplicate_names: bool = False
    maple_prompt_depth: int = 9
    proda_num_prompts: int = 32
    learner_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.class_names = list(self.class_names)
        self.learner_options = dict(self.learner_options)
        validate_class_names(self.class_names, self.allow_duplicate_names)
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1 (the number of learned context vectors), got {self.n_ctx}.")
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(
                f"Unknown class_token_position {self.class_token_position!r}: use one of {CLASS_TOKEN_POSITIONS}."
            )
        if self.maple_prompt_depth < 1 or self.proda_num_prompts < 1:
            raise ValueError(
                f"maple_prompt_depth and proda_num_prompts must be >= 1, got {self.maple_prompt_depth} and "
                f"{self.proda_num_prompts}."
            )
        if self.template.count("{}") != 1:
            raise ValueError(f"template must contain '{{}}' exactly once (the class name), got {self.template!r}.")
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise ValueError("ctx_init is empty: give a text such as 'a photo of a', or None for random init.")

    @property
    def num_context_vectors(self) -> int:
        """Rows of the peft prompt embedding: M, or M per class with class-specific context."""
        return self.n_ctx * (len(self.class_names) if self.class_specific_context else 1)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        content = {**asdict(self), FORMAT_VERSION_KEY: FORMAT_VERSION}
        write_json(os.path.join(save_directory, PROMPT_CONFIG_NAME), content, indent=2, ensure_ascii=False)

    def logit_settings(self) -> dict:
        """Every option that changes the logits: all but where the base model is (which a user may repoint), and
        ``learner_options`` only when set, so that prompts saved before that field existed keep their digest."""
        skipped = {"base_model_name_or_path", *([] if self.learner_options else ["learner_options"])}
        return {key: value for key, value in asdict(self).items() if key not in skipped}

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PromptConfig:
        return cls.from_saved(path)[0]

    @classmethod
    def from_saved(cls, path: str | os.PathLike) -> tuple[PromptConfig, int]:
        """The config in ``path`` and the format version it was saved with (1: before digests existed)."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        version = data.pop(FORMAT_VERSION_KEY, 1)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path} has unknown prompt-config keys {sorted(unknown)}; was it written by cmp_hf?")
        return cls(**data), version


def validate_class_names(class_names: list[str], allow_duplicates: bool = False) -> None:
    """Reject what would silently produce a wrong classifier: no names, blank names, duplicates (unless allowed)."""
    if not class_names:
        raise ValueError("class_names is empty: pass one name per class, in label order.")
    blank = [i for i, name in enumerate(class_names) if not isinstance(name, str) or not name.strip()]
    if blank:
        raise ValueError(f"class_names has empty or non-string entries at positions {blank}.")
    seen: dict[str, int] = {}
    for i, name in enumerate(class_names):
        if name in seen and not allow_duplicates:
            raise ValueError(
                f"class_names has a duplicate: {name!r} at positions {seen[name]} and {i} (set "
                "allow_duplicate_class_names if this is intended, as for CLIP's ImageNet names)."
            )
        seen[name] = i


@dataclass
class PromptTokens:
    """Token ids of every class prompt, and for each position the context vector written there (-1: none)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    context_index: torch.Tensor


def _text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []


def resolve_n_ctx(config: PromptConfig, tokenizer: PreTrainedTokenizerBase) -> PromptConfig:
    """With ``ctx_init``, M is the number of tokens of that text (CoOp's rule)."""
    if config.ctx_init is None:
        return config
    return replace(config, n_ctx=len(_text_ids(tokenizer, config.ctx_init)))


def tokenize_prompts(
    config: PromptConfig, tokenizer: PreTrainedTokenizerBase, max_positions: int, pad_to: int | None = None
) -> PromptTokens:
    """Build the C prompts, right-padded to the longest one (or to ``pad_to``, e.g. CoOp's 77).

    Context positions hold the BOS id as a placeholder (never EOS, so EOS pooling, including the legacy
    ``argmax`` pooling of configs with ``eos_token_id == 2``, still finds the real end of the prompt).
    """
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer needs BOS and EOS tokens (CLIP's <|startoftext|> and <|endoftext|>).")
    prefix, suffix = config.template.split("{}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    m = config.n_ctx
    rows: list[list[tuple[int, int]]] = []
    for c, name in enumerate(config.class_names):
        first = c * m if config.class_specific_context else 0
        ctx = [(bos, first + i) for i in range(m)]
        name = name.replace("_", " ")
        # The whole text in one call, as CoOp tokenizes its prompts: BPE merges across the name's end
        # ("prey)." gives one ")." token, not ")" + ".").
        text = [(t, -1) for t in _text_ids(tokenizer, prefix + name + suffix)]
        if config.class_token_position == "end":
            body = ctx + text
        else:  # CoOp's split: the name's own token count goes before the (second half of the) context
            name_len = len(_text_ids(tokenizer, prefix + name))
            name_part, rest = text[:name_len], text[name_len:]
            if config.class_token_position == "middle":
                body = ctx[: m // 2] + name_part + ctx[m // 2 :] + rest
            else:
                body = name_part + ctx + rest
        row = [(bos, -1)] + body + [(eos, -1)]
        if len(row) > max_positions:
            raise ValueError(
                f"The prompt for class {name!r} needs {len(row)} tokens ({m} context vectors included) but the text "
                f"encoder holds at most {max_positions}: shorten the class name or lower n_ctx."
            )
        rows.append(row)
    length = max(len(row) for row in rows)
    if pad_to is not None:
        if not length <= pad_to <= max_positions:
            raise ValueError(f"pad_to={pad_to} must lie between the longest prompt ({length}) and {max_positions}.")
        length = pad_to
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    context_index = torch.full((len(rows), length), -1, dtype=torch.long)
    for c, row in enumerate(rows):
        input_ids[c, : len(row)] = torch.tensor([t for t, _ in row])
        context_index[c, : len(row)] = torch.tensor([i for _, i in row])
        attention_mask[c, : len(row)] = 1
    return PromptTokens(input_ids, attention_mask, context_index)


def initial_context(
    config: PromptConfig, tokenizer: PreTrainedTokenizerBase, token_embedding: torch.nn.Embedding
) -> torch.Tensor:
    """CoOp's initial context: the embeddings of ``ctx_init`` (copied per class for CSC) or N(0, 0.02) draws from
    torch's global generator (seed it for reproducible runs; ``CMPTrainer`` does)."""
    weight = token_embedding.weight
    if config.ctx_init is None:
        return torch.randn(config.num_context_vectors, weight.shape[1]) * 0.02
    ids = torch.tensor(_text_ids(tokenizer, config.ctx_init), device=weight.device)
    if len(ids) != config.n_ctx:
        raise ValueError(f"ctx_init {config.ctx_init!r} has {len(ids)} tokens but n_ctx is {config.n_ctx}.")
    vectors = weight[ids].detach().float().cpu()
    return vectors.repeat(config.num_context_vectors // config.n_ctx, 1)


CoOpPromptConfig = PromptConfig
"""The name ``PromptConfig`` had before it held every learner's options; kept so that saved code still imports."""
