"""File names of everything cmp_hf writes, defined once (peft's own names where peft writes the file)."""

from peft.utils.constants import CONFIG_NAME as ADAPTER_CONFIG_NAME
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from transformers.trainer import TRAINER_STATE_NAME  # noqa: F401  (Trainer's; written last into a checkpoint)

PROMPT_CONFIG_NAME = "prompt_config.json"  # the prompt's classes, template, context layout, learner, base model
PROMPT_DIGEST_NAME = "prompt_digest.json"  # SHA-256 of the learned tensors of each weights file, checked on load
CALIBRATION_NAME = "calibration.json"  # post-hoc calibration fitted after training (cmp_hf.posthoc)
CALIBRATION_FEATURES_NAME = "calibration.safetensors"  # the training images' features of the shift-aware temperature
META_NET_NAME = "meta_net.safetensors"  # CoCoOp's meta-network: peft has no slot for it, so it sits beside the adapter
PRODA_CONTEXTS_NAME = "proda_contexts.safetensors"  # ProDA's contexts 1..K-1 (context 0 is the peft adapter's)
MAPLE_PROMPTS_NAME = "maple_prompts.safetensors"  # MaPLe's deep text prompts and text-to-vision coupling maps
PROMPTSRC_PROMPTS_NAME = "promptsrc_prompts.safetensors"  # PromptSRC's deep text prompts and vision prompts
TRAINING_ARGS_NAME = "training_args.json"
MODEL_CARD_NAME = "README.md"
EVAL_DIR = "eval"  # eval/<set>/ holds one eval set's report
# Metrics, by the same name wherever they are: a recipe run's of every eval set in output_dir ({set: {metric: value}},
# cmp_hf.run_record.RunRecord), one eval set's report in eval/<set>/ (cmp_hf.eval_report)
METRICS_NAME = "metrics.json"
RELIABILITY_DIAGRAM_NAME = "reliability.png"
RISK_COVERAGE_NAME = "risk_coverage.png"
FEWSHOT_SPLIT_NAME = "fewshot_split.json"  # the few-shot sample a recipe run drew (reused on a re-run)
OUTPUT_DIR_LOCK_NAME = ".cmp_hf.lock"  # held by the run writing to an output directory (cmp_hf.runs)
RUN_INFO_NAME = "run.json"  # what a recipe run was (dataset, setting, shots, seed, loss, calibration)
SWEEP_CONFIG_NAME = "sweep_config.yaml"  # the config a sweep composed for one run (recipes/sweep.py)
SWEEP_JOB_NAME = "sweep_job.json"  # a sweep job's record in its run directory: job id, logs, resume point, error

PROMPT_FILES = (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME, PROMPT_CONFIG_NAME)  # the minimum a saved prompt holds

# Training options that shape a run's trajectory: a checkpoint whose training_args.json differs in one of them is
# another run's and is not resumed (cmp_hf.runs). The prompt's own options are compared through prompt_config.json.
RUN_IDENTITY_FIELDS = (
    "seed", "data_seed", "learning_rate", "optim", "optim_args", "weight_decay", "adam_beta1", "adam_beta2",
    "per_device_train_batch_size", "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps",
    "coop_schedule", "coop_warmup_epochs", "coop_warmup_lr", "cmp_lambda", "cmp_form", "cmp_competitors",
    "label_smoothing_factor", "focal_gamma", "mbls_weight", "mbls_margin", "kgcoop_weight", "kgcoop_template",
    "augment", "augmented_views", "proda_prompts_per_step", "proda_diversity_weight",
)  # fmt: skip

# Text encoding of class prompts (cmp_hf.prompts.shared_prefix)
TEXT_LENGTH_BUCKETS = 4  # class suffixes run in at most this many length groups (padding vs. per-group overhead)

# Named recipes (CMPConfig(preset=...), recipe YAMLs, the sweep's --losses): CMPConfig options each one sets.
# "calibrated": chosen on the micro-CLIP benchmark (README, "Calibrated by default"; recipes/bench_calibration.py).
PRESETS = {
    "calibrated": {
        "cmp_lambda": 0.0,
        "temperature_scaling": True,
        "shift_strength": 0.2,
        "shift_neighbours": 5,
        "zero_shot_weight": 0.0,
        "transfer_zero_shot_weight": 0.5,
        "zero_shot_min_accuracy": 0.8,
    },
}
