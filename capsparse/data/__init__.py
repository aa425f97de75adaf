"""Data for capsparse: GLUE (local TSV copy or the hub), SQuAD v1.1, and their metrics.

Importing this package is light: ``datasets`` / ``transformers`` are imported only inside the functions
that need them.
"""

from .glue import (
    GLUE_DIR_ENV,
    GLUE_TASKS,
    GlueTask,
    get_glue_task,
    glue_task_names,
    load_glue,
    read_glue_tsv,
    resolve_glue_dir,
    tokenization_cache_path,
    tokenize_dataset,
)
from .metrics import compute_glue_metrics, main_metric, task_metric_names
from .squad import (
    load_squad,
    load_squad_json,
    normalize_answer,
    missing_squad_error,
    postprocess_predictions,
    prepare_eval_features,
    prepare_train_features,
    resolve_squad_file,
    squad_eval_features,
    squad_metrics,
    squad_train_features,
)

__all__ = [
    "GLUE_DIR_ENV",
    "GLUE_TASKS",
    "GlueTask",
    "get_glue_task",
    "glue_task_names",
    "load_glue",
    "read_glue_tsv",
    "resolve_glue_dir",
    "tokenization_cache_path",
    "tokenize_dataset",
    "compute_glue_metrics",
    "main_metric",
    "task_metric_names",
    "load_squad",
    "load_squad_json",
    "normalize_answer",
    "missing_squad_error",
    "postprocess_predictions",
    "prepare_eval_features",
    "prepare_train_features",
    "resolve_squad_file",
    "squad_eval_features",
    "squad_metrics",
    "squad_train_features",
]
