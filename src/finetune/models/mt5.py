"""mT5 text-to-text task models (PROTOCOLS D, cross-lingual: mT5-xl-lm-adapt, full finetune).

Every task is trained the same way, seq2seq cross-entropy on the target tokens
(``batch["labels"]``, padded with -100). Evaluation differs by task kind:

* classification (the datamodule's ``label_names`` are the answer strings, e.g. XNLI,
  WiC, TyDiQA answerability): rank classification, the prediction is the answer whose
  target tokens have the highest summed log-probability. The encoder runs once per
  example and the decoder once for all choices together (choices batched).
* generation (``label_names`` empty or None: QA, summarization): greedy decoding.

The validation / test score is the task's own metric (``metric``), computed with the evaluation
stage's code (``src/evaluate/text_metrics.py``) and logged as ``val/acc`` / ``test/acc``, the key
the export (``TaskCheckpointExport(monitor="val/acc")``) and early stopping select on, so a
checkpoint is selected on the metric it is evaluated with:

* ``accuracy``: rank classification (every classification task);
* ``em_f1``: the mean of SQuAD exact match and F1, the best over each example's references (QA);
* ``sp_rouge``: the mean of ROUGE-1/2/L F-measures over the mT5 tokenizer's SentencePiece pieces
  (summarization).

``metric="auto"`` picks accuracy for classification and, for generation, looks the datamodule's
task up in :data:`GENERATION_METRICS` (``squad``/``xquad`` -> ``em_f1``, ``wiki_lingua`` ->
``sp_rouge``). All three are means of per-example scores, so :meth:`MT5Seq2Seq.evaluate_batch`
returns ``(sum of the batch's scores, batch size)`` and the base class's ``MeanMetric`` (DDP-synced,
sample-weighted) gives the whole split's score, the number ``text_metrics`` computes from all
predictions at once. The saved init args (``task.json``) name the resolved metric, so a reloaded
module scores the same way without a datamodule. The decoded strings, references and scores are kept
in :attr:`MT5Seq2Seq.generations` (emptied when a validation / test epoch starts).

Batches: ``input_ids``, ``attention_mask``, ``labels``; optionally ``class_index`` (the
gold choice of a classification example; otherwise it is the choice whose tokens equal
``labels``), ``choice_labels`` (per-example choices ``(B, C, L)``, -100 padded, overriding
the label names), ``references`` (every gold string of each example, for generation) and
``targets`` (the target string, the reference when ``references`` is absent; otherwise
``labels`` decoded).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from ..base import TaskModule, config_model_id, seeded_build
from ..optim import OptimSpec
from .llama_nli import resolve_dtype

IGNORE = -100
METRICS = ("auto", "accuracy", "em_f1", "sp_rouge")
#: the metric of each generation task (base task names and their aliases, as the cross-lingual
#: datamodule's ``base_task`` / the first part of its ``task`` name)
GENERATION_METRICS = {"squad": "em_f1", "xquad": "em_f1", "wiki_lingua": "sp_rouge", "wikilingua": "sp_rouge"}


def untied_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` with each tied tensor once, under its first name.

    mT5 ties ``encoder.embed_tokens`` and ``decoder.embed_tokens`` (and ``lm_head`` when
    ``tie_word_embeddings``) to ``shared``; ``shared.weight`` comes first in the state
    dict, so it is the name kept — the name ``save_pretrained`` keeps too.
    """
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach()
    return out


def pad_choices(token_ids: list[list[int]]) -> torch.Tensor:
    """``(C, L)`` target ids, -100 padded (ignored by the loss and by choice scoring)."""
    length = max(len(t) for t in token_ids)
    return torch.tensor([t + [IGNORE] * (length - len(t)) for t in token_ids], dtype=torch.long)


class MT5Seq2Seq(TaskModule):
    """Full finetune of ``MT5ForConditionalGeneration``; rank classification or greedy generation."""

    family = "mt5"

    def __init__(
        self,
        pretrained: str = "google/mt5-xl-lm-adapt",
        tokenizer: Optional[str] = None,
        optim: Optional[OptimSpec] = None,
        torch_dtype: Optional[str] = "float32",
        model_config: Optional[dict] = None,
        init_seed: int = 0,
        max_new_tokens: int = 64,
        gradient_checkpointing: bool = False,
        label_smoothing: float = 0.0,
        finetune: Literal["full"] = "full",
        lora: Optional[dict] = None,
        metric: Literal["auto", "accuracy", "em_f1", "sp_rouge"] = "auto",
    ):
        # finetune / lora are accepted so that the saved init args (which include the base
        # class's) construct the module again; mT5 task models are full finetunes only.
        if finetune != "full" or lora:
            raise ValueError("MT5Seq2Seq is a full finetune (finetune='full', no lora)")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        super().__init__(pretrained, finetune="full", optim=optim, label_smoothing=label_smoothing)
        self.tokenizer_name = tokenizer or pretrained
        self.torch_dtype = torch_dtype  # float32 master weights; use precision="bf16-mixed" for speed
        self.model_config = model_config
        self.init_seed = init_seed
        self.max_new_tokens = max_new_tokens
        self.gradient_checkpointing = gradient_checkpointing
        self.metric = metric
        self._tokenizer = None
        self._choices: Optional[tuple[tuple[str, ...], torch.Tensor]] = None
        self.generations: list[dict] = []

    @property
    def base_model_id(self) -> str:
        return config_model_id(self.pretrained, self.model_config, self.init_seed)

    # ----- building -----------------------------------------------------------------
    def load_base(self) -> torch.nn.Module:
        from transformers import MT5Config, MT5ForConditionalGeneration

        dtype = resolve_dtype(self.torch_dtype)
        if self.model_config is not None:
            config = MT5Config(**self.model_config)
            model = seeded_build(lambda: MT5ForConditionalGeneration(config), self.init_seed).to(dtype)
        else:
            model = MT5ForConditionalGeneration.from_pretrained(self.pretrained, dtype=dtype)
        return model.requires_grad_(False)

    def build_model(self, label_names: Optional[list[str]], templates: Optional[list[str]] = None) -> None:
        self.label_names = list(label_names or [])
        self.model = self.load_base().requires_grad_(True)
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def setup(self, stage: str) -> None:
        # a generation datamodule (CrossLingualDataModule on SQuAD / WikiLingua) has label_names None
        dm = self.trainer.datamodule if self._trainer is not None else None
        if self.label_names is None and dm is not None and getattr(dm, "label_names", []) is None:
            self.label_names, self.templates = [], None
            self.build_model([], None)
            return
        super().setup(stage)

    @property
    def tokenizer(self):
        """Loaded on first use, so that a module rebuilt from a checkpoint needs no extra step."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        return self._tokenizer

    @property
    def is_classification(self) -> bool:
        return bool(self.label_names)

    @property
    def choice_labels(self) -> torch.Tensor:
        """``(C, L)`` target ids of the label names (the answer choices), -100 padded."""
        if self._choices is None or self._choices[0] != tuple(self.label_names):
            ids = self.tokenizer(list(self.label_names))["input_ids"]
            self._choices = (tuple(self.label_names), pad_choices(ids))
        return self._choices[1]

    # ----- training -----------------------------------------------------------------
    def target_logits(self, batch: dict) -> torch.Tensor:
        """``(B, L, V)`` teacher-forced logits of the target tokens ``batch["labels"]``."""
        return self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=self.model.prepare_decoder_input_ids_from_labels(batch["labels"]),
        ).logits

    def seq2seq_loss(self, batch: dict) -> torch.Tensor:
        """Token-level cross-entropy over the target tokens (-100 ignored), as the HF loss."""
        return F.cross_entropy(self.target_logits(batch).float().flatten(0, 1), batch["labels"].flatten(),
                               ignore_index=IGNORE, label_smoothing=self.label_smoothing)

    def example_losses(self, batch: dict) -> torch.Tensor:
        """``(B,)`` summed negative log-likelihood of each example's target tokens (-100 ignored)."""
        nll = F.cross_entropy(self.target_logits(batch).float().transpose(1, 2), batch["labels"],
                              ignore_index=IGNORE, reduction="none")
        return nll.sum(dim=-1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.seq2seq_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    # ----- rank classification ------------------------------------------------------
    def choice_scores(self, input_ids, attention_mask, choice_labels: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` summed log-probabilities of each choice's target tokens.

        ``choice_labels`` is ``(C, L)`` (shared choices) or ``(B, C, L)``, -100 padded. The
        encoder runs on the ``B`` inputs once; its states are repeated for the ``B * C``
        decoder rows, which run in one batch.
        """
        batch_size = input_ids.shape[0]
        if choice_labels.dim() == 2:
            choice_labels = choice_labels.unsqueeze(0).expand(batch_size, -1, -1)
        num_choices = choice_labels.shape[1]
        labels = choice_labels.reshape(batch_size * num_choices, -1)
        encoded = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        hidden = encoded.last_hidden_state.repeat_interleave(num_choices, dim=0)
        out = self.model(
            encoder_outputs=(hidden,),
            attention_mask=attention_mask.repeat_interleave(num_choices, dim=0),
            decoder_input_ids=self.model.prepare_decoder_input_ids_from_labels(labels),
        )
        log_probs = out.logits.float().log_softmax(dim=-1)
        token_lp = log_probs.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return (token_lp * (labels != IGNORE)).sum(dim=-1).view(batch_size, num_choices)

    def gold_choice(self, batch: dict, choices: torch.Tensor) -> torch.Tensor:
        """``batch["class_index"]``, or the choice whose target ids equal ``batch["labels"]``."""
        if "class_index" in batch:
            return batch["class_index"]
        labels = batch["labels"]
        if choices.dim() == 2:
            choices = choices.unsqueeze(0).expand(labels.shape[0], -1, -1)
        length = max(labels.shape[-1], choices.shape[-1])
        labels = F.pad(labels, (0, length - labels.shape[-1]), value=IGNORE)
        choices = F.pad(choices, (0, length - choices.shape[-1]), value=IGNORE)
        match = (choices == labels.unsqueeze(1)).all(dim=-1)
        if not match.any(dim=-1).all():
            raise ValueError("a target is none of the label names; pass batch['class_index']")
        return match.int().argmax(dim=-1)

    # ----- generation ---------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict) -> list[str]:
        """Greedy decoding (one beam, no sampling) of the batch's inputs."""
        out = self.model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    def references(self, batch: dict) -> list[str]:
        """The target string of each example (``targets``, else ``labels`` decoded)."""
        if "targets" in batch:
            return list(batch["targets"])
        labels = batch["labels"].masked_fill(batch["labels"] == IGNORE, self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(labels, skip_special_tokens=True)

    def reference_lists(self, batch: dict) -> list[list[str]]:
        """Every gold string of each example: ``references`` when the batch has them, else the target."""
        if "references" in batch:
            return [[r] if isinstance(r, str) else list(r) for r in batch["references"]]
        return [[r] for r in self.references(batch)]

    # ----- evaluation ---------------------------------------------------------------
    def resolve_metric(self, task: Optional[str] = None) -> str:
        """The evaluation metric for this module's labels and the (datamodule's) ``task`` name."""
        if self.metric != "auto":
            if (self.metric == "accuracy") != self.is_classification:
                kind = "classification" if self.is_classification else "generation"
                raise ValueError(f"metric {self.metric!r} does not fit a {kind} task")
            return self.metric
        if self.is_classification:
            return "accuracy"
        if task is not None and task in GENERATION_METRICS:
            return GENERATION_METRICS[task]
        raise ValueError(f"no metric known for the generation task {task!r} (known: {sorted(GENERATION_METRICS)}); "
                         "pass metric='em_f1' or 'sp_rouge'")

    def _datamodule_task(self) -> Optional[str]:
        dm = self._trainer.datamodule if self._trainer is not None else None
        task = getattr(dm, "base_task", None) or getattr(dm, "task", None)
        return None if task is None else str(task).split("-")[0]

    @property
    def eval_metric(self) -> str:
        """The resolved metric (``metric``, or for ``"auto"`` from the labels and the datamodule's task)."""
        return self.resolve_metric(self._datamodule_task())

    def text_scores(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
        """Per-example scores of generated text under :attr:`eval_metric` (``src/evaluate/text_metrics.py``)."""
        # imported here: the evaluate package imports the finetune modules (load_task_model)
        from ...evaluate.text_metrics import em_f1_scores, sp_rouge_scores

        if self.eval_metric == "em_f1":
            return em_f1_scores(predictions, references)["em_f1"]
        if self.eval_metric == "sp_rouge":
            return sp_rouge_scores(predictions, references, self.tokenizer)["sp_rouge"]
        raise ValueError(f"metric {self.eval_metric!r} does not score generated text")

    def evaluate_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the batch's per-example scores, batch size): the number correct for accuracy,
        summed EM/F1 means or SP-ROUGE scores for generation (a float tensor then)."""
        n = len(batch["input_ids"])
        metric = self.eval_metric
        if self.is_classification:
            choices = batch["choice_labels"] if "choice_labels" in batch else self.choice_labels
            choices = choices.to(batch["input_ids"].device)
            preds = self.choice_scores(batch["input_ids"], batch["attention_mask"], choices).argmax(dim=-1)
            return (preds == self.gold_choice(batch, choices)).sum(), torch.tensor(n, device=preds.device)
        predictions, references = self.generate(batch), self.reference_lists(batch)
        scores = self.text_scores(predictions, references)
        self.generations.extend({"prediction": p, "reference": r[0], "references": r, metric: s}
                                for p, r, s in zip(predictions, references, scores))
        device = batch["input_ids"].device
        return torch.tensor(sum(scores), dtype=torch.float32, device=device), torch.tensor(n, device=device)

    def on_validation_epoch_start(self) -> None:
        self.generations = []

    def on_test_epoch_start(self) -> None:
        self.generations = []

    def logits(self, batch: dict) -> torch.Tensor:
        """Classification tasks: the rank-classification scores ``(B, C)``."""
        if not self.is_classification:
            raise ValueError("generation tasks have no logits; use generate()")
        choices = batch["choice_labels"] if "choice_labels" in batch else self.choice_labels
        return self.choice_scores(batch["input_ids"], batch["attention_mask"], choices.to(batch["input_ids"].device))

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        """Rank-classification scores and the gold choice index (``labels`` holds target tokens)."""
        choices = batch["choice_labels"] if "choice_labels" in batch else self.choice_labels
        choices = choices.to(batch["input_ids"].device)
        scores = self.logits(batch)
        return {"logits": scores.float(), "labels": self.gold_choice(batch, choices)}

    # ----- export -------------------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        return untied_state_dict(self.model)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_head_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"mT5 task models have no head, got keys {sorted(state)[:5]}")

    def save_adapter(self, directory: Path) -> None:
        raise RuntimeError("mT5 task models are full finetunes: export trained_state_dict()")

    def init_args(self) -> dict:
        args = super().init_args()
        try:  # the resolved metric: a reloaded module needs no datamodule to know it
            args["metric"] = self.eval_metric
        except ValueError:
            pass
        return args

    def task_hparams(self) -> dict:
        hp = super().task_hparams()
        hp.update(torch_dtype=self.torch_dtype, max_new_tokens=self.max_new_tokens)
        try:  # what val_acc / test_acc of the exported metrics measure
            hp["metric"] = self.eval_metric
        except ValueError:
            hp["metric"] = self.metric
        return hp
