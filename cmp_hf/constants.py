"""File names of everything cmp_hf writes, defined once (peft's own names where peft writes the file)."""

from peft.utils.constants import CONFIG_NAME as ADAPTER_CONFIG_NAME
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME

PROMPT_CONFIG_NAME = "prompt_config.json"  # the prompt's classes, template, context layout, learner, base model
CALIBRATION_NAME = "calibration.json"  # post-hoc calibration fitted after training (cmp_hf.posthoc)
META_NET_NAME = "meta_net.safetensors"  # CoCoOp's meta-network: peft has no slot for it, so it sits beside the adapter
PRODA_CONTEXTS_NAME = "proda_contexts.safetensors"  # ProDA's contexts 1..K-1 (context 0 is the peft adapter's)
MAPLE_PROMPTS_NAME = "maple_prompts.safetensors"  # MaPLe's deep text prompts and text-to-vision coupling maps
TRAINING_ARGS_NAME = "training_args.json"
MODEL_CARD_NAME = "README.md"
EVAL_DIR = "eval"  # eval/<set>/ holds one eval set's report
EVAL_METRICS_NAME = "metrics.json"
RELIABILITY_DIAGRAM_NAME = "reliability.png"
RISK_COVERAGE_NAME = "risk_coverage.png"
FEWSHOT_SPLIT_NAME = "fewshot_split.json"  # the few-shot sample a recipe run drew (reused on a re-run)
RUN_METRICS_NAME = "metrics.json"  # a recipe run's metrics of every eval set, {set: {metric: value}}
RUN_INFO_NAME = "run.json"  # what a recipe run was (dataset, setting, shots, seed, loss, calibration)

PROMPT_FILES = (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, PROMPT_CONFIG_NAME)  # the minimum a saved prompt holds

# Text encoding of class prompts (cmp_hf.prompts.shared_prefix)
TEXT_LENGTH_BUCKETS = 4  # class suffixes run in at most this many length groups (padding vs. per-group overhead)
