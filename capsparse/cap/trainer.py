"""``CAPTrainer``: CAP pruning as a ``transformers.Trainer``.

Signature (stable; the CLI calls it directly)::

    CAPTrainer(model, args: TrainingArguments, cap_config: CAPConfig, train_dataset, eval_dataset=None,
               teacher=None, processing_class=None, data_collator=None, compute_metrics=None, callbacks=None)
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import warnings
from typing import Optional

import torch

import transformers
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..checkpoint import AtomicCheckpointCallback, resolve_resume_checkpoint
from ..distributed import process_group, rank
from ..guards import NanGuardCallback
from ..pruning.embeddings import freeze_embeddings
from ..pruning.method import PruningMethod, SoftMovementPruning, StructuredPruning, TopKPruning
from ..pruning.pruners import SALIENCY_BUFFERS, SCORE_ATTR, build_pruner
from ..pruning.structured import compact_model
from ..resources import GracefulStopCallback, TrainingStopped, stop_requested
from ..surgery import exact_state_dict, sparse_layers, sparsify
from .banks import BankSet, encode_pass, shard_indices
from .config import CAPConfig
from .heads import check_teacher, is_qa_model, task_head  # noqa: F401  (is_qa_model: re-exported)
from .losses import QueryKeyTap, RepresentationTap, cap_objective
from .query_head import average_head_grads, build_query_head
from .score_objective import TaskScoreGradients

CAP_STATE_NAME = "cap_state.pt"


class _CAPCallback(TrainerCallback):
    """Routes Trainer events to the trainer and its pruning method: bank encoding, mask updates, CAP state in
    checkpoints."""

    def __init__(self, trainer: "CAPTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._on_train_begin(state, kwargs.get("train_dataloader"))

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer._on_epoch_begin(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.pruning.step_begin(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.query_head is not None:  # Trainer zeroes the model's gradients only
            self.trainer.query_head.zero_grad(set_to_none=True)
        # masks for the next step's forwards (official: the scheduled value at global_step, at each forward)
        self.trainer.pruning.step(state.global_step + 1)

    def on_save(self, args, state, control, **kwargs):
        self.trainer._save_cap_state(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))


def _drop_idx(collator):
    def collate(features):
        batch = collator(features)
        batch.pop("idx", None)
        return batch
    return collate


class CAPTrainer(transformers.Trainer):
    """Prune a sequence-classification or question-answering model with CAP (Xu et al., AAAI 2022).

    Args:
        model: a transformers ``...ForSequenceClassification`` or ``...ForQuestionAnswering`` (BERT family),
            dense. It is pruned in place:
            unstructured/block methods swap the encoder linears for :class:`capsparse.SparseLinear`
            (``block_size`` for "block-movement") and add ``movement_scores`` parameters; "first-order"
            adds head / FFN-neuron mask buffers and hooks (:meth:`compact` removes them physically).
        args: ``TrainingArguments``. ``max_steps`` / epochs define the schedule's total steps. For
            "first-order", ``num_train_epochs`` should be ``structured_steps * epochs_per_step``: the total
            optimizer steps are split evenly into the pruning steps.
        cap_config: a :class:`CAPConfig` (e.g. ``CAPConfig.recipe("glue-unstructured")``).
        train_dataset: tokenised, with ``input_ids``, ``attention_mask``, optional ``token_type_ids``, ``labels``
            (question answering: ``start_positions`` and ``end_positions`` instead) and ``idx`` (example id
            ``0..N-1``; the banks are indexed by it; for SQuAD one id per training *feature*, i.e. window).
        eval_dataset, processing_class, data_collator, compute_metrics, callbacks: as ``Trainer``.
        teacher: the dense fine-tuned teacher (KD and FiC). ``None``: a copy of ``model`` is fine-tuned first
            for ``cap_config.teacher_epochs`` epochs (only when KD or FiC is on).
        prc_model: the dense pre-trained model that encodes the PrC bank. ``None`` (the official code): the
            student before its first update, which is the pre-trained model when the student starts from it; a
            student that starts from the fine-tuned teacher needs the pre-trained model here, else PrC is a
            second copy of FiC.

    Wiring: what differs between tasks is the task head's (``self.head``, :mod:`capsparse.cap.heads`), what
    prunes and when is the pruning method's (``self.pruning``, :mod:`capsparse.pruning.method`); the trainer
    routes Trainer events to them and owns the banks, the objective and checkpoints.

    Question answering (SQuAD): the task loss is the mean start/end cross-entropy, KD the mean start/end
    ``T^2 * KL`` over the real tokens (:func:`capsparse.cap.losses.qa_kd_loss`), the teacher's start/end logits
    are cached per feature, and the contrastive terms are unsupervised only (``w_s`` must be 0: there are no
    class labels; the "squad-*" recipes set it) on the ``"cls"`` or ``"mean"`` representation (QA models have
    no pooler).

    After :meth:`train`, :meth:`sparsity_report` gives the reached sparsity; training fails with a
    ``RuntimeError`` when it misses ``target_sparsity`` by more than ``sparsity_tolerance`` (soft movement
    only warns: its sparsity is set by the L1 weight).
    """

    def __init__(self, model, args, cap_config: CAPConfig, train_dataset, eval_dataset=None, teacher=None,
                 processing_class=None, data_collator=None, compute_metrics=None, callbacks=None, prc_model=None):
        if not isinstance(cap_config, CAPConfig):
            raise TypeError(f"cap_config: expected a capsparse.cap.CAPConfig, got {type(cap_config).__name__}")
        if train_dataset is None:
            raise ValueError("train_dataset: expected a tokenised dataset with an 'idx' column, got None")
        if getattr(args, "load_best_model_at_end", False) and not hasattr(transformers.Trainer,
                                                                            "_determine_best_metric"):
            raise ValueError(f"load_best_model_at_end=True: CAPTrainer chooses among checkpoints at the target "
                             f"sparsity through Trainer._determine_best_metric, which transformers "
                             f"{transformers.__version__} lacks; set load_best_model_at_end=False")
        if getattr(args, "fp16", False) and cap_config.score_criterion == "saliency":
            raise ValueError("fp16=True with score_criterion='saliency': the gradient scaler never unscales the "
                             "saliency statistics' gradients (they are not parameters); use bf16=True or fp32")
        if getattr(args, "fp16", False) and (args.use_cpu or not torch.cuda.is_available()):
            raise ValueError("fp16=True: float16 mixed precision needs a CUDA device (it trains through a gradient "
                             "scaler); on the CPU use bf16=True, or neither")
        cfg = cap_config
        self.cap_config = cfg
        self.head = task_head(model)  # everything that differs between tasks
        self._ids, self._train_labels = self.head.prepare(cfg, train_dataset)
        self.n_examples = len(self._ids)
        self.needs_teacher = cfg.needs_teacher
        if teacher is not None:
            check_teacher(teacher, model)
        self.teacher = teacher
        if prc_model is not None:
            if "prc" not in cfg.active_banks:
                raise ValueError(f"prc_model: given, but the PrC bank is off (banks={cfg.banks}, use_cap="
                                 f"{cfg.use_cap}); expected no prc_model, or 'prc' among the active banks")
            got, want = getattr(prc_model.config, "hidden_size", None), model.config.hidden_size
            if got != want:
                raise ValueError(f"prc_model: expected hidden_size={want} (the student's), got {got}")
            prc_model.eval().requires_grad_(False)
        self.prc_model = prc_model
        self._dense_copy = copy.deepcopy(model) if (teacher is None and self.needs_teacher) else None

        self.pruning = pruning_method(cfg, model, self)  # what prunes, and when
        if cfg.embeddings_frozen:
            freeze_embeddings(model)
        self.tap = RepresentationTap(model)
        self._qk_taps = None  # (student, teacher) QueryKeyTap, made on first use: the teacher may be fine-tuned later
        # training-only, beside the model (never exported): optimizer, cap_state.pt, grads averaged by hand
        self.query_head = build_query_head(cfg.query_head, model.config.hidden_size)  # config: none without CAP

        if data_collator is None:
            data_collator = (transformers.DataCollatorWithPadding(processing_class) if processing_class is not None
                             else transformers.default_data_collator)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics,
                         callbacks=[_CAPCallback(self), NanGuardCallback(policy=cfg.nan_policy),
                                    GracefulStopCallback()] + list(callbacks or []))
        # last, so that every other on_save (our cap_state.pt included) has written before the manifest
        self.add_callback(AtomicCheckpointCallback())
        self.model_accepts_loss_kwargs = False  # compute_loss returns a mean: let Trainer scale for accumulation
        self.banks: Optional[BankSet] = None
        self.snapshot_epochs = set()
        self._restored = False
        self._steps_per_epoch = None
        self._parts_sum, self._parts_n = {}, 0
        self._task_score_grads = TaskScoreGradients()  # score_objective="task"
        self.last_sparsity_report = None

    # -- the pruning method's parts, by their former names ------------------------------------------------
    @property
    def pruner(self):
        """The :class:`~capsparse.pruning.pruners.Pruner` of the unstructured / block methods (else ``None``)."""
        return getattr(self.pruning, "pruner", None)

    @property
    def structured_masks(self):
        """first-order: the head / neuron masks (else ``None``)."""
        return getattr(self.pruning, "masks", None)

    @property
    def stage(self) -> int:
        """first-order: pruning stages done."""
        return getattr(self.pruning, "stage", 0)

    @property
    def schedule(self):
        """The cubic schedule of the unstructured / block methods, once training began (else ``None``)."""
        return getattr(self.pruning, "schedule", None)

    # -- data ------------------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        # private, no public hook: Trainer drops the columns forward() does not take, but compute_loss needs idx and
        # the labels (args.label_names would also change prediction_step's labels)
        super()._set_signature_columns_if_needed()
        for col in ("idx", "labels", "label", "start_positions", "end_positions"):
            if col not in self._signature_columns:
                self._signature_columns.append(col)

    @property
    def importance_batch_size(self) -> int:
        """CAP-f's importance pass runs at the training batch size (as the official code) unless configured."""
        return self.cap_config.importance_batch_size or self.args.per_device_train_batch_size

    def _encode_loader(self, shard: bool = True, limit: Optional[int] = None, batch_size: Optional[int] = None):
        ds = self.train_dataset
        try:
            import datasets
            if isinstance(ds, datasets.Dataset):
                ds = self._remove_unused_columns(ds, description="CAP encoding")  # as Trainer's own loaders
        except ImportError:
            pass
        indices = shard_indices(len(ds)) if shard else torch.arange(len(ds))
        bs = batch_size or self.cap_config.encode_batch_size or self.args.per_device_eval_batch_size
        if limit is not None:
            indices = indices[:limit * bs]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, indices.tolist()), batch_size=bs,
                                             shuffle=False, collate_fn=self.data_collator)
        for batch in loader:
            yield self._prepare_inputs(batch)

    # -- representations and loss -------------------------------------------------------------------------
    def _encode_fn(self, tap, want_logits):
        kind, head = self.cap_config.representation, self.head

        def fn(model, batch):
            batch, _, _ = head.split(batch)
            tap.clear()
            out = model(**batch)
            reps = tap.representation(kind, batch.get("attention_mask"), query=False)
            if not want_logits:
                return reps, None
            return reps, head.cache_logits(head.logits(out), batch.get("attention_mask"))
        return fn

    def _objective(self, logits, labels, ids, attention_mask, use_contrastive=True, hidden=None, attention=None):
        cfg = self.cap_config
        teacher_logits = None
        if cfg.w_kd > 0 and self.banks is not None and self.banks.teacher_logits is not None:
            teacher_logits = self.banks.teacher_logits[ids.to(self.banks.device)]
        query = None
        use_contrastive = use_contrastive and self._contrast_on()
        if cfg.use_cap and use_contrastive and self.banks is not None and self.banks.ready():
            query = self.tap.representation(cfg.representation, attention_mask, query=True)
            if self.query_head is not None:
                query = self.query_head(query)
        reg = self.pruning.regularization()
        return cap_objective(cfg, logits, labels, ids, query, banks=self.banks if query is not None else None,
                             teacher_logits=teacher_logits, contrastive_labels=self.head.contrastive_labels(labels),
                             regularization=reg, reg_lambda=self.pruning.reg_lambda(self.state.global_step),
                             use_contrastive=use_contrastive, attention_mask=attention_mask, head=self.head,
                             split=True, hidden=hidden, attention=attention)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs, labels, ids = self.head.split(inputs)
        if labels is None:
            raise ValueError(self.head.missing_labels)
        self.tap.clear()
        self._task_score_grads.disarm()
        training = model.training and ids is not None
        layerwise = training and self.cap_config.w_hidden > 0
        attention = training and self.cap_config.w_attention > 0
        if attention and self._qk_taps is None:
            self._qk_taps = (QueryKeyTap(self.model), QueryKeyTap(self.teacher))
        with self._qk_taps[0].recording() if attention else contextlib.nullcontext():
            outputs = model(**inputs, output_hidden_states=True) if layerwise else model(**inputs)
        logits = self.head.logits(outputs)
        if not training:  # evaluation: the task loss only
            loss = self.head.task_loss(logits, labels)
        else:
            hidden, attn = self._teacher_pairs(outputs, inputs, layerwise, attention)
            loss, parts, task, contrastive = self._objective(logits, labels, ids, inputs.get("attention_mask"),
                                                             hidden=hidden, attention=attn)
            if self.cap_config.score_objective == "task" and contrastive is not None and torch.is_grad_enabled():
                self._task_score_grads.arm(loss, task, self.pruning.score_tensors())
            for k, v in parts.items():
                self._parts_sum[k] = self._parts_sum.get(k, 0.0) + v
            self._parts_n += 1
        return (loss, outputs) if return_outputs else loss

    def _teacher_pairs(self, outputs, inputs, layerwise: bool, attention: bool):
        """One no-grad teacher forward for the distillation terms that need one: ``(hidden, attention)``, each
        ``None`` when off. ``hidden``: (student, teacher) encoder-layer outputs, the embedding output (index 0)
        left out (the term matches what the encoder layers compute; embeddings are frozen by default in the
        unstructured methods, where the student's equals the teacher's). ``attention``: (student, teacher)
        ``(q, k)`` per layer and the head width."""
        if not (layerwise or attention):
            return None, None
        with torch.no_grad(), self._qk_taps[1].recording() if attention else contextlib.nullcontext():
            teacher_out = self.teacher(**inputs, output_hidden_states=True) if layerwise else self.teacher(**inputs)
        hidden = (outputs.hidden_states[1:], teacher_out.hidden_states[1:]) if layerwise else None
        attn = None
        if attention:
            student_tap, teacher_tap = self._qk_taps
            attn = (student_tap.pairs(), teacher_tap.pairs(), student_tap.head_dim)
            student_tap.clear()  # the loss holds what it needs; the taps keep nothing past the step
            teacher_tap.clear()
        return hidden, attn

    # -- optimizer / scheduler -------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model
        scores = self.pruning.score_parameters()
        score_ids = {id(p) for p in scores}
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in score_ids]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        if scores:
            groups.append({"params": scores, "lr": self.cap_config.score_lr, "weight_decay": 0.0})
        if self.query_head is not None:  # last: earlier checkpoints' group order stays valid
            groups.append({"params": list(self.query_head.to(self.args.device).parameters()), "weight_decay": 0.0})
        groups = [g for g in groups if g["params"]]
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        factor = self.pruning.lr_factor(num_training_steps)
        if factor is None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
            self._created_lr_scheduler = True  # Trainer's own flag: it then rebuilds the scheduler per train()
        return self.lr_scheduler

    # -- training events -----------------------------------------------------------------------------------
    def _on_train_begin(self, state, train_dataloader):
        ga = self.args.gradient_accumulation_steps
        self._steps_per_epoch = max(1, math.ceil(len(train_dataloader) / ga)) if train_dataloader is not None else 1
        epochs = self.args.num_train_epochs if self.args.max_steps <= 0 else None  # None: max_steps sets the length
        self.pruning.begin(state.max_steps, self._steps_per_epoch, num_train_epochs=epochs)
        device = self.args.device
        if self.teacher is not None:
            self.teacher.to(device).eval()
        if not self._restored:
            self._build_banks(state)
        self.pruning.step(state.global_step)  # the first masks

    def _before_optimizer_step(self):
        if self.query_head is not None:  # outside the model: Trainer neither syncs nor clips it
            average_head_grads(self.query_head)
            if self.args.max_grad_norm and self.args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.query_head.parameters(), self.args.max_grad_norm)
        self.pruning.before_optimizer_step()

    def _bank_reps(self, state) -> dict:
        cfg = self.cap_config
        reps = {}
        for name in cfg.active_banks:
            if name == "snc":
                r = cfg.max_snapshots
                if r is None:
                    r = (self.pruning.steps - 1 if self.pruning.stagewise
                         else max(1, math.ceil(state.num_train_epochs) - 1))
                if r < 1:
                    continue
                reps[name] = r
            else:
                reps[name] = 1
        return reps

    def _allocate_banks(self, reps):
        labels = None if self._train_labels is None else self.head.contrastive_labels(self._train_labels)
        return BankSet.allocate(self.n_examples, self.model.config.hidden_size, reps, self.cap_config.bank_dtype,
                                self.cap_config.bank_device, self.args.device, labels=labels,
                                seed=self.args.seed + 17 * rank())

    def _build_banks(self, state):
        cfg = self.cap_config
        self.banks = self._allocate_banks(self._bank_reps(state))
        if self.teacher is not None and self.needs_teacher:
            tap = RepresentationTap(self.teacher)
            try:
                ids, reps, logits = encode_pass(self.teacher, self._encode_loader(),
                                                self._encode_fn(tap, want_logits=True), train_mode=False,
                                                n_examples=self.n_examples, want_logits=True)
            finally:
                tap.remove()
            if cfg.w_kd > 0:
                cache = torch.zeros((self.n_examples,) + tuple(logits.shape[1:]), device=self.banks.device)
                cache[ids.to(self.banks.device)] = logits.to(self.banks.device)
                self.banks.teacher_logits = cache
            if "fic" in self.banks.banks:
                self.banks["fic"].write(self.banks["fic"].new_slot(), ids, reps)
        if not self.pruning.stagewise and "prc" in self.banks.banks:  # stagewise: PrC at the first stage
            self._encode_student("prc", train_mode=False, seed=self.args.seed)

    def _encode_student(self, name, train_mode, seed):
        model, tap = self.model, self.tap
        if name == "prc" and self.prc_model is not None:
            # the given pre-trained model instead of the student: a student that starts from the fine-tuned
            # teacher would otherwise make PrC a second copy of FiC
            model, train_mode = self.prc_model.to(self.args.device), False
            tap = RepresentationTap(model)
        try:
            ids, reps, _ = encode_pass(model, self._encode_loader(), self._encode_fn(tap, False),
                                       train_mode=train_mode, seed=seed, n_examples=self.n_examples)
        finally:
            if tap is not self.tap:
                tap.remove()
        bank = self.banks[name]
        bank.write(bank.new_slot(), ids, reps)

    def _contrast_on(self) -> bool:
        """``contrastive_phase="pruning"``: the contrastive terms stop once the schedule reaches its final mask."""
        if self.cap_config.contrastive_phase == "all" or self.schedule is None:
            return True
        return self.state.global_step < self.schedule.prune_end

    def _on_epoch_begin(self, state):
        cfg = self.cap_config
        if self.pruning.stagewise or self.banks is None or "snc" not in self.banks.banks or not self._contrast_on():
            return
        epoch = state.global_step // self._steps_per_epoch
        if epoch >= 1 and epoch not in self.snapshot_epochs:
            self._encode_student("snc", train_mode=cfg.snapshot_mode == "train", seed=self.args.seed + 1000 * epoch)
            self.snapshot_epochs.add(epoch)

    def _importance_inputs(self, stage):
        """first-order: the importance pass's loss (CAP's objective; contrastive from the second stage on) and
        batches."""
        cfg = self.cap_config

        def loss_fn(batch):
            batch, labels, ids = self.head.split(batch)
            self.tap.clear()
            out = self.model(**batch)
            loss, *_ = self._objective(self.head.logits(out), labels, ids, batch.get("attention_mask"),
                                       use_contrastive=stage > 0)
            return loss
        return loss_fn, self._encode_loader(limit=cfg.importance_batches, batch_size=self.importance_batch_size)

    def _before_stage_masks(self, stage):
        """first-order: the student enters the banks as it is before the stage's masks (PrC first, then SnC)."""
        cfg = self.cap_config
        if self.banks is not None:
            name = "prc" if stage == 0 else "snc"
            if name in self.banks.banks:
                self._encode_student(name, train_mode=(name == "snc" and cfg.snapshot_mode == "train"),
                                     seed=self.args.seed + 1000 * stage)

    def _after_stage_masks(self, stage):
        """first-order: a fresh optimizer state for the new stage (as the official code's new optimizer)."""
        if self.optimizer is not None:
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            inner.state.clear()

    # -- logging ---------------------------------------------------------------------------------------------
    def log(self, logs, start_time=None):
        if "loss" in logs and self._parts_n:
            for k, v in self._parts_sum.items():  # full precision: run.log and the plots read these
                logs[k] = float(v) / self._parts_n
            self._parts_sum, self._parts_n = {}, 0
            logs["sparsity"] = self.sparsity_report()["global"]
            turnover = self.pruning.mask_turnover()
            if turnover is not None:
                logs["mask_turnover"] = turnover
        if "eval_loss" in logs:  # which evaluations were at the target (load_best_model_at_end chooses among those)
            logs["eval_sparsity"] = self.sparsity_report()["global"]
        super().log(logs, start_time)

    def _at_target(self) -> bool:
        cfg = self.cap_config
        return abs(self.sparsity_report()["global"] - cfg.target_sparsity) <= cfg.sparsity_tolerance

    def _determine_best_metric(self, metrics, trial):
        # load_best_model_at_end: a checkpoint from the sparsity ramp is not the model asked for, however good.
        # Private, no public hook: callbacks see the metrics (on_evaluate) but cannot veto a new best checkpoint
        if not self._at_target():
            return False
        return super()._determine_best_metric(metrics, trial)

    # -- reporting -------------------------------------------------------------------------------------------
    def sparsity_report(self) -> dict:
        """:meth:`capsparse.sparsity.SparsityReport.as_dict`: ``{"global", "kept", "total", "per_layer",
        "encoder_params"}``.

        ``global`` counts the weights of the six encoder linears per layer (the pruning scope, on which the
        target is defined); ``encoder_params`` also counts encoder biases and LayerNorms as remaining (the
        official ``counts_parameters.py``). Embeddings, pooler and head are excluded.
        """
        if getattr(self, "_compacted_report", None) is not None:
            return self._compacted_report
        return self.pruning.sparsity_report().as_dict()

    def _check_sparsity(self):
        cfg = self.cap_config
        report = self.sparsity_report()
        self.last_sparsity_report = report
        miss = abs(report["global"] - cfg.target_sparsity)
        if miss <= cfg.sparsity_tolerance:
            return report
        msg = (f"reached sparsity {report['global']:.4f} misses target_sparsity {cfg.target_sparsity} by {miss:.4f} "
               f"(> sparsity_tolerance {cfg.sparsity_tolerance})")
        if not self.pruning.exact_target:
            warnings.warn(f"soft movement: {msg}; the sparsity is set by soft_lambda_final, tune it", stacklevel=3)
            return report
        raise RuntimeError(msg)

    # -- train / checkpoints -------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True or resume_from_checkpoint == "True":
            # newest checkpoint whose manifest verifies; half-written or corrupted ones are set aside
            resume_from_checkpoint = resolve_resume_checkpoint(self.args.output_dir, True)
            if resume_from_checkpoint is None:
                raise ValueError(f"resume_from_checkpoint: no complete checkpoint found in {self.args.output_dir}")
        elif resume_from_checkpoint:
            resolve_resume_checkpoint(self.args.output_dir, resume_from_checkpoint)  # verifies, names a bad file
        if resume_from_checkpoint:
            self._load_cap_state(resume_from_checkpoint)
        if self.needs_teacher and self.teacher is None and not self._restored:
            self.teacher = self._finetune_teacher()
        out = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                            ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        signum = stop_requested(self)
        if signum is not None and self.state.global_step < self.state.max_steps:
            raise TrainingStopped(self.state.global_step, self.state.max_steps, signum, self.args.output_dir)
        self._check_sparsity()
        return out

    def _finetune_teacher(self):
        """Fine-tune a dense copy of the model (CE only) for ``teacher_epochs``."""
        teacher = self._dense_copy
        self._dense_copy = None
        targs = dataclasses.replace(self.args, output_dir=os.path.join(self.args.output_dir, "teacher"),
                                    num_train_epochs=self.cap_config.teacher_epochs, max_steps=-1,
                                    save_strategy="no", eval_strategy="no", report_to="none",
                                    load_best_model_at_end=False, push_to_hub=False, warmup_steps=0)
        trainer = transformers.Trainer(model=teacher, args=targs, train_dataset=self.train_dataset,
                                       data_collator=_drop_idx(self.data_collator))
        trainer.train()
        return teacher.eval()

    def _cap_state(self) -> dict:
        return {"config": self.cap_config.to_dict(),
                "banks": None if self.banks is None else self.banks.state_dict(),
                "bank_reps": None if self.banks is None else {n: b.max_reps for n, b in self.banks.banks.items()},
                "snapshot_epochs": sorted(self.snapshot_epochs),
                "query_head": None if self.query_head is None else self.query_head.state_dict(),
                **self.pruning.state_dict()}

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False):
        """As ``Trainer.save_model``: a Hugging Face directory holding the pruned model (each SparseLinear's masked
        weight and its mask) that :func:`capsparse.from_pretrained` loads back as the same pruned model. The
        training-only movement scores and saliency statistics are left out (checkpoints keep them)."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        model = self.accelerator.unwrap_model(self.model)
        before = model._keys_to_ignore_on_save  # save_pretrained drops these keys (matched exactly)
        training_only = (SCORE_ATTR, *SALIENCY_BUFFERS)
        model._keys_to_ignore_on_save = set(before or ()) | {n for n in model.state_dict(keep_vars=True)
                                                             if n.endswith(training_only)}
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            model._keys_to_ignore_on_save = before

    def _save_checkpoint(self, model, trial):
        # private, no public hook runs around the checkpoint's model save (on_save comes after it)
        with exact_state_dict(self.model):  # the pruned entries too: they can grow back after a resume
            super()._save_checkpoint(model, trial)

    def _save_cap_state(self, out: str) -> None:
        """on_save: the banks, snapshot epochs and the pruning method's state beside the checkpoint."""
        if self.args.should_save:
            torch.save(self._cap_state(), os.path.join(out, CAP_STATE_NAME))
        if self.banks is not None and process_group(multi=True) is not None:  # each process samples its extras
            os.makedirs(out, exist_ok=True)
            torch.save(self.banks.generator.get_state(), os.path.join(out, f"cap_rng_{rank()}.pt"))

    def _load_cap_state(self, checkpoint: str):
        path = os.path.join(checkpoint, CAP_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"resume_from_checkpoint: {checkpoint} has no {CAP_STATE_NAME}; expected a CAPTrainer "
                             f"checkpoint")
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain containers only
        if state["banks"] is not None:
            self.banks = self._allocate_banks(state["bank_reps"])
            self.banks.load_state_dict(state["banks"])
            rng = os.path.join(checkpoint, f"cap_rng_{rank()}.pt")
            if os.path.isfile(rng):
                self.banks.generator.set_state(torch.load(rng, weights_only=True))
        self.snapshot_epochs = set(state["snapshot_epochs"])
        head = state.get("query_head")
        if (head is None) != (self.query_head is None):
            raise ValueError(f"resume_from_checkpoint: {checkpoint} was saved with "
                             f"{'no' if head is None else 'a'} query head, but query_head="
                             f"{self.cap_config.query_head!r}; expected the checkpoint's setting")
        if head is not None:
            self.query_head.load_state_dict(head)
        self.pruning.load_state_dict(state)
        self._restored = True

    # -- after training ------------------------------------------------------------------------------------------
    def compact(self) -> dict:
        """first-order: physically remove the pruned heads / neurons (same logits as the masked model)."""
        if self.structured_masks is None:
            raise ValueError("compact: only method='first-order' has heads/neurons to remove")
        report = self.sparsity_report()
        removed = compact_model(self.model, self.structured_masks)
        self._compacted_report = report  # the removed weights are gone: keep the masked model's report
        return removed

    def finalize(self) -> None:
        """Remove score parameters and hooks: the model keeps plain SparseLinear layers with their masks."""
        self.pruning.finalize()
        self.tap.remove()
        if self._qk_taps is not None:  # the attention term's hooks, on the student and on the teacher
            for tap in self._qk_taps:
                tap.remove()
            self._qk_taps = None


def pruning_method(cfg: CAPConfig, model, trainer: Optional[CAPTrainer] = None) -> PruningMethod:
    """The :class:`~capsparse.pruning.method.PruningMethod` of ``cfg`` on ``model`` (unstructured and block
    methods swap the encoder linears for SparseLinear first); ``trainer`` supplies first-order's importance pass
    and what happens around its stages."""
    if cfg.structured:
        hooks = {} if trainer is None else dict(importance_inputs=trainer._importance_inputs,
                                                before_masks=trainer._before_stage_masks,
                                                after_masks=trainer._after_stage_masks)
        return StructuredPruning(model, cfg.target_sparsity, cfg.structured_steps, cfg.heads_protected,
                                 cfg.structured_warmup_ratio, cfg.epochs_per_step, **hooks)
    if not sparse_layers(model):
        sparsify(model, block_size=cfg.block_size, dropout=cfg.fast_dropout)
    kwargs = {}
    if cfg.method == "magnitude":
        kwargs["scope"] = cfg.magnitude_scope
    else:
        kwargs.update(score_init=cfg.score_init, block_score_mode=cfg.block_score_mode,
                      score_init_mode=cfg.score_init_mode, score_init_scale=cfg.score_init_scale)
        if cfg.method == "soft-movement":
            kwargs["min_keep"] = cfg.soft_min_keep
        else:
            kwargs.update(score_criterion=cfg.score_criterion, saliency_betas=cfg.saliency_betas)
    pruner = build_pruner(cfg.method, model, **kwargs)
    schedule = dict(unit=cfg.schedule_unit, initial_warmup=cfg.initial_warmup, final_warmup=cfg.final_warmup)
    if cfg.method == "soft-movement":
        return SoftMovementPruning(pruner, cfg.target_sparsity, cfg.sparsity_tolerance, cfg.schedule_warmup,
                                   final_sigmoid_threshold=cfg.soft_final_threshold,
                                   lambda_final=cfg.soft_lambda_final, **schedule)
    return TopKPruning(pruner, cfg.target_sparsity, cfg.sparsity_tolerance, cfg.schedule_warmup, **schedule)


def prune_model(model, train_dataset, cap_config: Optional[CAPConfig] = None, output_dir: str = "capsparse-prune",
                teacher=None, eval_dataset=None, compact: bool = True, **training_kwargs):
    """Convenience: run :class:`CAPTrainer` and return ``(model, sparsity_report)``.

    ``training_kwargs`` go to ``TrainingArguments`` (``output_dir`` given separately). The model comes back
    finalised (no score parameters or hooks) and, for "first-order" with ``compact=True``, compacted.
    """
    cfg = cap_config if cap_config is not None else CAPConfig()
    training_kwargs.setdefault("report_to", "none")
    args = transformers.TrainingArguments(output_dir=output_dir, **training_kwargs)
    trainer = CAPTrainer(model, args, cfg, train_dataset, eval_dataset=eval_dataset, teacher=teacher)
    trainer.train()
    report = trainer.sparsity_report()
    if compact and trainer.structured_masks is not None:
        trainer.compact()
    trainer.finalize()
    return trainer.model, report
