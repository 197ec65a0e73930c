"""Decoder-LLM sequence classifier for the NLI tasks (docs/protocols.md B: Llama-3-8B, six NLI tasks).

``AutoModelForSequenceClassification`` with a 3-way ``score`` head, LoRA on the attention
projections, optionally on a 4-bit / 8-bit bitsandbytes base so that one 24-80 GB GPU
suffices. The head is trained too (PEFT ``modules_to_save``) but is the task's own: it is
saved to ``head.safetensors`` (``score.weight``) and never merged, so
:meth:`LlamaNLIClassifier.save_adapter` writes only the backbone LoRA factors.

Two-class tasks (QNLI, RTE, SciTail) share the 3-slot head: their ``label_names`` have two
entries, ids 0 and 1, and the unused slot(s) ``len(label_names):`` are masked to ``-inf``
in training and evaluation, so the model is trained and scored as a 2-way classifier.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors.torch import save_file

from ..base import LoraSpec, TaskModule, config_model_id, seeded_build
from ..optim import OptimSpec

HEAD_MODULE = "score"


def llama_lora_spec() -> LoraSpec:
    """docs/protocols.md B: rank 16, alpha 16 on the four attention projections."""
    return LoraSpec(r=16, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def resolve_dtype(torch_dtype) -> torch.dtype:
    """``None`` means bfloat16 on a GPU (an 8B model does not fit otherwise), float32 on CPU."""
    if torch_dtype is None:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype


def load_tokenizer(pretrained: str):
    """The model's tokenizer with a pad token (Llama-3 has none: pad with eos, as the model does)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pretrained)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def bnb_config(quantization: str, compute_dtype: torch.dtype):
    """QLoRA's settings: nf4 with double quantization, or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be None, '4bit' or '8bit', got {quantization!r}")


def build_llama_classifier(
    pretrained: str,
    num_labels: int = 3,
    torch_dtype=None,
    quantization: Optional[Literal["4bit", "8bit"]] = None,
    model_config: Optional[dict] = None,
    device_map=None,
    init_seed: int = 0,
):
    """The base ``*ForSequenceClassification`` model, built the same way for training and reloading.

    ``model_config`` builds a randomly initialized model (seeded) from a ``LlamaConfig``
    (tests); quantization needs weights to load, so it requires ``pretrained`` (a hub id or
    a path). ``config.pad_token_id`` is set to eos when missing: the head reads the last
    non-pad token, and a batch of more than one sequence fails without a pad id. The head is
    kept in float32 (AdamW updates of a bf16 head are mostly rounded away).
    """
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    dtype = resolve_dtype(torch_dtype)
    if model_config is not None:
        if quantization:
            raise ValueError("quantization needs saved weights: save the model and pass its path as `pretrained`")
        config = LlamaConfig(**{**model_config, "num_labels": num_labels})
        model = seeded_build(lambda: AutoModelForSequenceClassification.from_config(config, dtype=dtype), init_seed)
    else:
        kwargs = {}
        if quantization:
            kwargs["quantization_config"] = bnb_config(quantization, dtype)
            if device_map is not None:
                kwargs["device_map"] = device_map
        model = AutoModelForSequenceClassification.from_pretrained(
            pretrained, num_labels=num_labels, dtype=dtype, **kwargs
        )
    if model.config.pad_token_id is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    head = model.get_submodule(HEAD_MODULE)
    head.float()
    head.register_forward_pre_hook(_cast_input_to_head_dtype)  # deep-copied into PEFT's head copy
    return model


def _cast_input_to_head_dtype(module, args):
    return (args[0].to(module.weight.dtype),) + tuple(args[1:])


def keep_4bit_weights_differentiable_on_cpu(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a ``Linear4bit`` weight the first
    time the layer runs in eval mode without grad (e.g. Lightning's sanity check), and the
    packed path has no backward: later training steps silently drop the gradient through
    every frozen 4-bit layer, so LoRA factors below the top layer get wrong gradients.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def mask_missing_labels(logits: torch.Tensor, num_task_labels: int) -> torch.Tensor:
    """Set the head slots the task has no label for to ``-inf`` (never predicted, zero probability)."""
    if num_task_labels >= logits.shape[-1]:
        return logits
    slots = torch.arange(logits.shape[-1], device=logits.device)
    return logits.masked_fill(slots >= num_task_labels, float("-inf"))


class LlamaNLIClassifier(TaskModule):
    """LoRA (or full) finetune of a decoder LLM with a 3-way classification head.

    Batches: ``input_ids``, ``attention_mask`` (padding with the eos id, see
    :func:`load_tokenizer`) and ``labels`` (class ids into ``label_names``).
    """

    family = "llama_seqcls"

    def __init__(
        self,
        pretrained: str = "meta-llama/Meta-Llama-3-8B",
        num_labels: int = 3,
        finetune: Literal["lora", "full"] = "lora",
        lora: Optional[LoraSpec] = None,
        optim: Optional[OptimSpec] = None,
        quantization: Optional[Literal["4bit", "8bit"]] = None,
        torch_dtype: Optional[str] = None,
        model_config: Optional[dict] = None,
        init_seed: int = 0,
        gradient_checkpointing: bool = False,
        label_smoothing: float = 0.0,
    ):
        super().__init__(
            pretrained,
            finetune=finetune,
            lora=lora or llama_lora_spec(),
            optim=optim or OptimSpec(lr=3e-5, scheduler="linear", warmup=0.06),
            label_smoothing=label_smoothing,
        )
        if quantization and finetune != "lora":
            raise ValueError("a quantized base can only be finetuned with LoRA")
        self.num_labels = num_labels
        self.quantization = quantization
        self.torch_dtype = torch_dtype
        self.model_config = model_config
        self.init_seed = init_seed
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def base_model_id(self) -> str:
        return config_model_id(self.pretrained, self.model_config, self.init_seed)

    # ----- building -----------------------------------------------------------------
    def load_base(self) -> torch.nn.Module:
        device_map = None
        if self.quantization and self._trainer is not None:
            device_map = {"": self.trainer.strategy.root_device}  # bnb quantizes where it loads
        model = build_llama_classifier(self.pretrained, self.num_labels, self.torch_dtype, self.quantization,
                                       self.model_config, device_map, self.init_seed)
        if self.quantization:
            keep_4bit_weights_differentiable_on_cpu(model)
        return model.requires_grad_(False)

    def build_model(self, label_names: list[str], templates: Optional[list[str]] = None) -> None:
        if not 1 < len(label_names) <= self.num_labels:
            raise ValueError(f"{len(label_names)} label names for a {self.num_labels}-way head: {label_names}")
        self.label_names = list(label_names)
        model = self.load_base()
        ckpt_kwargs = {"use_reentrant": False}
        if self.quantization:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, self.gradient_checkpointing, gradient_checkpointing_kwargs=ckpt_kwargs
            )
        elif self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
        if self.finetune == "lora":
            from peft import get_peft_model

            model = get_peft_model(model, self.lora.peft_config(task_type="SEQ_CLS", modules_to_save=[HEAD_MODULE]))
        else:
            model.requires_grad_(True)
        self.model = model

    # ----- forward / loss -----------------------------------------------------------
    def logits(self, batch: dict) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return mask_missing_labels(out.logits.float(), len(self.label_names))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # the masked slots are dropped rather than left at -inf: label smoothing would sum them
        return super().loss(logits[:, : len(self.label_names)], labels)

    # ----- head ---------------------------------------------------------------------
    def _head(self) -> torch.nn.Module:
        head = self.unwrapped_model().get_submodule(HEAD_MODULE)
        if hasattr(head, "modules_to_save"):  # PEFT ModulesToSaveWrapper: the trained copy
            head = head.modules_to_save["default"]
        return head

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{HEAD_MODULE}.{k}": v.detach() for k, v in self._head().state_dict().items()}

    def load_head_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        prefix = HEAD_MODULE + "."
        if not state or not all(k.startswith(prefix) for k in state):
            raise KeyError(f"a {self.family} head has keys {prefix}*, got {sorted(state)}")
        self._head().load_state_dict({k[len(prefix):]: v for k, v in state.items()})

    # ----- export -------------------------------------------------------------------
    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Full finetune: every trained backbone weight (the head is saved separately)."""
        state = super().trained_state_dict()
        return {k: v for k, v in state.items() if not k.startswith(HEAD_MODULE + ".")}

    def save_adapter(self, directory: Path) -> None:
        """Write the backbone LoRA factors only, as a plain PEFT adapter.

        The saved config has no ``modules_to_save`` and no task type, so loading it with
        ``PeftModel.from_pretrained`` onto a base that already carries the task head
        (:meth:`load_base` + :meth:`load_head_state_dict`) leaves that head in place.
        """
        from peft import get_peft_model_state_dict
        from peft.utils import SAFETENSORS_WEIGHTS_NAME

        if self.finetune != "lora":
            raise RuntimeError("full-finetune task models are exported with trained_state_dict()")
        state = get_peft_model_state_dict(self.model)
        lora = {k: v.detach().contiguous().cpu() for k, v in state.items() if ".lora_" in k}
        others = [k for k in state if k not in lora and f".{HEAD_MODULE}." not in k]
        if others:
            raise RuntimeError(f"unexpected trainable adapter weights besides LoRA and the head: {others[:5]}")
        config = copy.deepcopy(self.model.peft_config["default"])
        config.modules_to_save = None
        config.task_type = None
        config.inference_mode = True
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(directory))
        save_file(lora, str(directory / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})

    def task_hparams(self) -> dict:
        return {
            **super().task_hparams(),
            "num_labels": self.num_labels,
            "quantization": self.quantization,
            "torch_dtype": str(resolve_dtype(self.torch_dtype)).removeprefix("torch."),
        }
