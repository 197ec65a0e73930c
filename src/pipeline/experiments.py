"""The papers' experiments as pipelines (docs/protocols.md A-E): what each trains, merges, evaluates.

Each :class:`Experiment` names the configs the stages already have: the finetune config and tasks
file (``train_all`` writes one task checkpoint per task into ``checkpoints``), optionally the
permutation merge step (experiment E), and the evaluation config (selection sweeps, data
statistics on first need, learned coefficients, the Ensemble, joint benchmarks, ``report.md`` and
plots next to its rows). ``smoke_tasks`` / ``smoke_generalization``: the tasks a smoke run trains
(the first held-in, the rest scored as generalization tasks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Experiment:
    name: str
    about: str
    needs: str
    finetune: str                 # configs/finetune/<...>.yaml
    tasks_file: str               # configs/finetune/tasks/<...>.yaml
    checkpoints: str              # where train_all writes the task checkpoints (the evaluation config reads them)
    evaluate: str                 # configs/evaluate/<...>.yaml
    permute: Optional[str] = None  # configs/permute/<...>.yaml (models from different initializations)
    multitask: Optional[str] = None  # the multitask baseline's output (the evaluation config scores it: method merged)
    tasks: Optional[tuple[str, ...]] = None  # train only these tasks of the tasks file (None: all)
    smoke_tasks: tuple[str, ...] = ()
    smoke_generalization: tuple[str, ...] = ()
    writes: str = ""
    analyses: tuple[str, ...] = ()  # Pipeline.analysis_<name> in src/pipeline/__main__.py, run after the evaluation
    scaling_protocol: str = "knots"  # knots | cart | compositional (the scaling analysis' sampler)
    scaling_setting: str = "vision"  # compositional: 20 draws (vision) or 5 (language)


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in [
    Experiment(
        "A_knots_vitb32", "KnOTS: CLIP ViT-B/32 LoRA (r16) on the 8 vision tasks; per-task and joint 748-label Hits@k",
        "one GPU (~8 GB), hub weights openai/clip-vit-base-patch32, the 8 datasets (hub or data_root); hours",
        "A_knots_vitb32_lora.yaml", "A_vision.yaml", "checkpoints/A_vitb32_lora", "A_knots_vitb32_lora.yaml",
        smoke_tasks=("mnist", "eurosat"), analyses=("cka", "scaling"),
        writes="results/A_knots_vitb32_lora/{rows.jsonl,report.md,sensitivity.png}, .../cka/, .../scaling/"),
    Experiment(
        "A_knots_vitl14", "KnOTS: CLIP ViT-L/14 LoRA (r16) on the 8 vision tasks",
        "one GPU (~24 GB), hub weights openai/clip-vit-large-patch14, the 8 datasets; hours",
        "A_knots_vitl14_lora.yaml", "A_vision.yaml", "checkpoints/A_vitl14_lora", "A_knots_vitl14_lora.yaml",
        smoke_tasks=("mnist", "eurosat"), analyses=("cka",), writes="results/A_knots_vitl14_lora/"),
    Experiment(
        "B_knots_nli", "KnOTS: Llama-3-8B LoRA on 6 NLI tasks, per-task heads",
        "one 24-80 GB GPU (bf16, or 4-bit), gated Llama-3 weights, the NLI datasets; hours",
        "B_knots_llama3_8b_nli.yaml", "B_nli.yaml", "checkpoints/B_llama3_8b", "B_knots_llama3_nli.yaml",
        smoke_tasks=("rte", "snli"), analyses=("cka",), writes="results/B_knots_llama3_nli/"),
    Experiment(
        "C_cart_vitb32", "CART: open_clip ViT-B/32 full finetunes of the 8 vision tasks (Tables 1-2, with test-time adaptation)",
        "GPU, the openclip extra, the 8 datasets (or converted released checkpoints); hours",
        "C_cart_vitb32_openclip_full.yaml", "A_vision.yaml", "checkpoints/C_vitb32_openclip", "C_cart_vitb32.yaml",
        multitask="checkpoints/C_vitb32_openclip-multitask",
        smoke_tasks=("mnist", "eurosat"), analyses=("scaling", "rank_sweeps"), scaling_protocol="cart",
        writes="results/C_cart_vitb32/ (+ scaling/, rank_sweeps/)"),
    Experiment(
        "C_cart_vitl14", "CART: open_clip ViT-L/14 full finetunes of the 8 vision tasks",
        "GPU (~40 GB for training), the openclip extra, the 8 datasets; hours",
        "C_cart_vitl14_openclip_full.yaml", "A_vision.yaml", "checkpoints/C_vitl14_openclip", "C_cart_vitl14.yaml",
        multitask="checkpoints/C_vitl14_openclip-multitask",
        smoke_tasks=("mnist", "eurosat"), writes="results/C_cart_vitl14/"),
    Experiment(
        "D_domainnet", "Compositional generalization: 24 DomainNet (category, domain) CLIP ViT-B/32 models; held-in and generalization",
        "GPU, DomainNet images + lists in data_root, CLIP weights; a day for 24 models",
        "D_domainnet_vitb32_full.yaml", "D_domainnet.yaml", "checkpoints/D_domainnet", "D_domainnet.yaml",
        multitask="checkpoints/D_domainnet-multitask",
        smoke_tasks=("bird-real", "tool-clipart"), smoke_generalization=("furniture-clipart",),
        analyses=("cost", "scaling"), scaling_protocol="compositional",
        writes="results/D_domainnet/ (+ cost/, scaling/)"),
    Experiment(
        "D_crosslingual", "Compositional generalization: mT5-xl-lm-adapt on 5 (task, language) pairs",
        "GPU with >= 40 GB (bf16), the cross-lingual datasets; a day",
        "D_crosslingual_mt5xl.yaml", "D_crosslingual.yaml", "checkpoints/D_mt5xl", "D_crosslingual.yaml",
        multitask="checkpoints/D_mt5xl-multitask",
        smoke_tasks=("xnli-ar", "squad-en"), analyses=("scaling",), scaling_protocol="compositional",
        scaling_setting="language", writes="results/D_crosslingual/ (+ scaling/)"),
    Experiment(
        "E_mudsc_cifar100", "MuDSC: ResNet-20x8 pair 0 from different inits on CIFAR-100 50+50; seven permutation merges; Table 1",
        "one small GPU, CIFAR-100 (hub or data_root), CLIP text tower weights; about an hour per pair",
        "E_mudsc_resnet20_cifar100.yaml", "E_cifar100_50_50.yaml", "checkpoints/E_resnet20x8", "E_mudsc_cifar100.yaml",
        permute="E_mudsc_cifar100.yaml", tasks=("cifar100-split0-0of2", "cifar100-split0-1of2"),
        smoke_tasks=("cifar100-split0-0of2", "cifar100-split0-1of2"),
        writes="checkpoints/E_resnet20x8-merged/split0/<method>/, results/E_mudsc_cifar100/"),
]}
