"""docs/protocols.md E: CIFAR class-subset datamodule and the from-scratch ResNet-20 with a CLIP text head.

Offline: a tiny CIFAR-10-like DatasetDict (class-dependent patterns) saved in the test, and a tiny
CLIP text tower built from a config.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from src.finetune.data.cifar import CifarSubsetDataModule, augment, cifar_classes, class_subsets
from src.finetune.export import export_task_checkpoint
from src.finetune.load import load_task_model
from src.finetune.models.resnet import ResNet20, ResNetClassifier
from src.finetune.optim import OptimSpec, build_optimizer
from src.task_checkpoint import TaskCheckpointError, read_task_info

from .conftest import TINY_CLIP, fit_losses

SGD = OptimSpec(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=0.0, scheduler="constant")


def write_tiny_cifar10(root):
    """``<root>/cifar10``: a save_to_disk DatasetDict shaped like uoft-cs/cifar10 (img, label)."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage

    names = cifar_classes("cifar10")
    patterns = np.random.RandomState(0).randint(0, 256, size=(10, 32, 32, 3))

    def split(n, seed):
        rng = np.random.RandomState(seed)
        labels = [i % 10 for i in range(n)]
        imgs = [PILImage.fromarray(np.clip(patterns[y] + rng.randint(-30, 31, size=(32, 32, 3)), 0, 255)
                                   .astype(np.uint8)) for y in labels]
        features = Features({"img": Image(), "label": ClassLabel(names=names)})
        return Dataset.from_dict({"img": imgs, "label": labels}, features=features)

    DatasetDict({"train": split(200, 1), "test": split(60, 2)}).save_to_disk(str(root / "cifar10"))
    return root


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar"))


def make_dm(root, subset=0, **kw):
    kw.setdefault("batch_size", 16)
    return CifarSubsetDataModule("cifar10", subset=subset, num_subsets=2, data_root=str(root), num_workers=0, **kw)


EMBED = TINY_CLIP["projection_dim"]  # the tiny text tower's embedding width


def make_module(**kw):
    kw.setdefault("optim", SGD)
    kw.setdefault("embed_dim", EMBED)
    return ResNetClassifier(width=1, clip_config=TINY_CLIP, **kw)


def built(dm, **kw):
    module = make_module(**kw)
    module.label_names = list(dm.label_names)
    module.build_model(module.label_names, dm.templates)
    return module




# ----- class split ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [10, 100])
def test_class_split_is_disjoint_covering_and_seeded(num_classes):
    subsets = class_subsets(num_classes, 2, seed=0)
    assert [len(s) for s in subsets] == [num_classes // 2] * 2
    assert not set(subsets[0]) & set(subsets[1])
    assert sorted(subsets[0] + subsets[1]) == list(range(num_classes))
    assert class_subsets(num_classes, 2, seed=0) == subsets
    assert class_subsets(num_classes, 2, seed=1) != subsets
    assert subsets[0] != sorted(subsets[0]) or subsets[1] != sorted(subsets[1])  # permuted, not 0..49
    three = class_subsets(num_classes, 3, seed=0)
    assert sorted(sum(three, [])) == list(range(num_classes))


def test_class_name_files():
    c100 = cifar_classes("cifar100")
    assert len(c100) == 100 and c100 == sorted(c100) and c100[1] == "aquarium_fish"
    assert cifar_classes("cifar10")[:3] == ["airplane", "automobile", "bird"]
    dm = CifarSubsetDataModule("cifar100", subset=1, seed=0)
    assert dm.class_ids == class_subsets(100, 2, 0)[1]
    assert dm.label_names == [c100[c].replace("_", " ") for c in dm.class_ids]
    assert dm.templates == ["a photo of a {}."] and dm.task == "cifar100-1of2"
    with pytest.raises(ValueError, match="subset"):
        CifarSubsetDataModule("cifar10", subset=2, num_subsets=2)


def test_split_seed_seeds_the_class_split_alone(cifar_root):
    """Pair p of experiment E: the class split seeded by split_seed, the data seed kept for the rest."""
    default = CifarSubsetDataModule("cifar100", subset=0, seed=5)
    assert default.split_seed is None and default.task == "cifar100-0of2"
    assert default.class_ids == class_subsets(100, 2, 5)[0]  # without split_seed: `seed` splits (as before)
    halves = [CifarSubsetDataModule("cifar100", subset=k, seed=5, split_seed=3) for k in (0, 1)]
    assert [dm.class_ids for dm in halves] == class_subsets(100, 2, 3)
    assert [dm.task for dm in halves] == ["cifar100-split3-0of2", "cifar100-split3-1of2"]
    assert CifarSubsetDataModule("cifar100", split_seed=4).class_ids != halves[0].class_ids
    # the data seed still seeds the validation hold-out: same split_seed, other seed -> other hold-out
    a, b = (make_dm(cifar_root, subset=0, seed=s, split_seed=1) for s in (0, 7))
    assert a.class_ids == b.class_ids == class_subsets(10, 2, 1)[0]
    a.setup()
    b.setup()
    assert a.splits["val"].indices != b.splits["val"].indices


def test_datamodule_reindexes_labels_and_splits(cifar_root):
    dm = make_dm(cifar_root, subset=0)
    sizes = dm.split_sizes()
    assert sizes == {"train": 90, "val": 10, "test": 30}  # 5 of 10 classes; 10% of 100 held out
    train_rows = set(dm.splits["train"].indices)
    assert not train_rows & set(dm.splits["val"].indices)
    wanted = set(dm.class_ids)
    for split in ("train", "val", "test"):
        data = dm.splits[split]
        assert {int(data.data[i]["label"]) for i in data.indices} <= wanted
    batch = next(iter(dm.val_dataloader()))
    assert batch["pixel_values"].shape == (10, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].min() >= 0 and batch["labels"].max() < 5
    # the label is the position of the original class in the subset
    data = dm.splits["val"]
    originals = [int(data.data[i]["label"]) for i in data.indices]
    assert batch["labels"].tolist() == [dm.class_ids.index(y) for y in originals]
    # evaluation batches are not augmented (identical twice); the same seed gives the same split
    again = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(again["pixel_values"], batch["pixel_values"])
    assert make_dm(cifar_root, subset=0).split_sizes() == sizes
    again_dm = make_dm(cifar_root, subset=0)
    again_dm.setup()
    assert again_dm.splits["val"].indices == dm.splits["val"].indices
    other = make_dm(cifar_root, subset=1)
    assert not set(other.class_ids) & wanted
    assert "torchvision" not in sys.modules


def test_augment_crops_and_flips():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = augment(images, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert not torch.equal(out, images)
    same = augment(images, padding=0, generator=torch.Generator().manual_seed(0))
    for i in range(2):  # no padding: either the image or its mirror
        assert torch.equal(same[i], images[i]) or torch.equal(same[i], images[i].flip(-1))


# ----- model -------------------------------------------------------------------------------------
def test_resnet20_shape_and_projection():
    net = ResNet20(width=2, out_dim=12)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 12)  # the pooled 128-d feature through proj
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 9 * 2 + 2  # stem, 2 per block, 2 projection shortcuts (19 + 1 fc = ResNet-20)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [net.proj] and (net.proj.in_features, net.proj.out_features) == (128, 12)
    assert list(net.state_dict())[-2:] == ["proj.weight", "proj.bias"]  # the network's last layer
    # the names the permutation spec (src/permute/specs.py) assumes
    names = set(net.state_dict())
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer3.2.bn2.running_var",
            "layer2.0.shortcut.0.weight", "layer3.0.shortcut.1.weight", "proj.weight", "proj.bias"} <= names
    assert not any(k.startswith("layer1.0.shortcut") for k in names)


def test_load_base_is_the_whole_network_with_proj():
    """ModelBank calls load_base() before any head is loaded: it must build the projection too."""
    module = make_module(init_seed=4)
    base = module.load_base()
    assert isinstance(base.proj, torch.nn.Linear)
    assert tuple(base.state_dict()["proj.weight"].shape) == (EMBED, 64)
    assert base(torch.randn(2, 3, 32, 32)).shape == (2, EMBED)
    assert not any(p.requires_grad for p in base.parameters())
    # seeded: the projection is part of init_seed's initialization
    torch.testing.assert_close(make_module(init_seed=4).load_base().proj.weight, base.proj.weight, atol=0, rtol=0)
    assert not torch.equal(make_module(init_seed=5).load_base().proj.weight, base.proj.weight)
    assert make_module(embed_dim=8).load_base().proj.out_features == 8
    assert make_module(embed_dim=8, init_seed=4).base_model_id != module.base_model_id  # the output width is recorded


def test_embed_dim_must_match_the_text_head(cifar_root):
    dm = make_dm(cifar_root)
    with pytest.raises(ValueError, match=r"embed_dim is 512.*set the model's embed_dim to 16"):
        built(dm, embed_dim=512)


def test_different_init_seeds_differ():
    a, b, a2 = (make_module(init_seed=s).load_base() for s in (0, 1, 0))
    sa, sb, sa2 = a.state_dict(), b.state_dict(), a2.state_dict()
    assert not torch.equal(sa["conv1.weight"], sb["conv1.weight"])
    for k in sa:
        torch.testing.assert_close(sa[k], sa2[k])
    assert make_module(init_seed=0).base_model_id != make_module(init_seed=1).base_model_id


def test_training_lowers_loss(cifar_root):
    dm = make_dm(cifar_root, subset=0)
    module = make_module()
    losses = fit_losses(module, dm, steps=18)
    assert len(losses) == 18 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    assert module.head.requires_grad is False
    assert all(p.requires_grad for p in module.model.parameters()) and module.model.proj.weight.requires_grad
    assert not hasattr(module, "proj")  # no projection outside the network
    opt = module.trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9


def test_export_and_reload_reproduce_logits(cifar_root, tmp_path):
    dm = make_dm(cifar_root, subset=1)
    module = make_module(init_seed=3)
    fit_losses(module, dm, steps=3)  # BatchNorm running statistics move away from their init
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        want = module.eval().logits(batch)
    out = export_task_checkpoint(module, tmp_path / "t", dm.task, {"finetuned": {"val_acc": 0.5}})
    info = read_task_info(out)
    assert info.kind == "full" and info.family == "resnet-cifar" and info.label_names == dm.label_names
    state = load_file(str(out / "model.safetensors"))
    assert set(state) == set(ResNet20(1, out_dim=EMBED).state_dict())  # the network's own names, buffers included
    assert "layer2.0.bn1.running_mean" in state and "layer3.0.shortcut.0.weight" in state
    assert state["proj.weight"].shape == (EMBED, 64) and state["proj.bias"].shape == (EMBED,)  # proj: the network's
    torch.testing.assert_close(state["proj.weight"], module.model.proj.weight.detach(), atol=0, rtol=0)
    head = load_file(str(out / "head.safetensors"))
    assert set(head) == {"weight", "logit_scale"}  # the frozen text head only
    assert head["weight"].shape == (5, EMBED)
    loaded = load_task_model(out)
    with torch.no_grad():
        got = loaded.logits(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fresh = built(dm, init_seed=3)
    with torch.no_grad():
        assert not torch.allclose(fresh.eval().logits(batch), want, atol=1e-3)
    # a head in the old layout (the projection in head.safetensors) is refused, naming the change
    old_head = {**head, "proj.weight": state["proj.weight"], "proj.bias": state["proj.bias"]}
    save_file(old_head, str(out / "head.safetensors"))
    with pytest.raises(TaskCheckpointError, match="old layout"):
        load_task_model(out)


def test_lightning_checkpoint_keeps_batchnorm_statistics(cifar_root):
    module = built(make_dm(cifar_root))
    checkpoint = {"state_dict": dict(module.state_dict())}  # what Lightning hands the hook
    module.on_save_checkpoint(checkpoint)
    assert "model.bn1.running_mean" in checkpoint["state_dict"]
    assert "model.conv1.weight" in checkpoint["state_dict"] and "model.proj.weight" in checkpoint["state_dict"]
    assert not any(k.startswith("proj.") for k in checkpoint["state_dict"])


def test_groupnorm_variant(cifar_root, tmp_path):
    dm = make_dm(cifar_root)
    module = built(dm, norm="group", groups=8)
    norms = [m for m in module.model.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.BatchNorm2d))]
    assert norms and all(isinstance(m, torch.nn.GroupNorm) for m in norms)
    assert module.model.bn1.num_groups == 8
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        want = module.eval().logits(batch)
    assert want.shape == (len(batch["labels"]), 5)
    loaded = load_task_model(export_task_checkpoint(module, tmp_path / "gn", dm.task))
    with torch.no_grad():
        torch.testing.assert_close(loaded.logits(batch), want)
    with pytest.raises(ValueError, match="norm"):
        make_module(norm="layer")
    with pytest.raises(ValueError, match="from scratch"):
        make_module(finetune="lora")


def test_optim_spec_sgd_and_default_adamw():
    p = torch.nn.Parameter(torch.ones(2))
    opt = build_optimizer([p], OptimSpec(optimizer="sgd", lr=0.1, momentum=0.8, nesterov=True,
                                         weight_decay=5e-4), 10)["optimizer"]
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.8 and opt.defaults["nesterov"] and opt.defaults["weight_decay"] == 5e-4
    assert isinstance(build_optimizer([p], OptimSpec(), 10)["optimizer"], torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer([p], OptimSpec(optimizer="adam"), 10)


def test_best_selection_restores_batchnorm_statistics_with_the_weights(cifar_root):
    """select='best' must bring back the best epoch's running statistics, not the last ones."""
    from types import SimpleNamespace

    from src.finetune.export import TaskCheckpointExport

    module = built(make_dm(cifar_root))
    bn = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    weight = next(p for p in module.parameters() if p.requires_grad)
    cb = TaskCheckpointExport(select="best", monitor="val/acc")
    with torch.no_grad():
        bn.running_mean.fill_(1.0)
        weight.fill_(0.5)
    cb.on_validation_end(SimpleNamespace(sanity_checking=False, callback_metrics={"val/acc": torch.tensor(0.9)},
                                         global_step=10, current_epoch=1), module)
    with torch.no_grad():  # a later, worse epoch moves both
        bn.running_mean.fill_(7.0)
        weight.fill_(-3.0)
    cb.on_validation_end(SimpleNamespace(sanity_checking=False, callback_metrics={"val/acc": torch.tensor(0.2)},
                                         global_step=20, current_epoch=2), module)
    cb._restore(module, cb._best_state)
    assert torch.all(bn.running_mean == 1.0) and torch.all(weight == 0.5)


# ----- experiment E's task lists -------------------------------------------------------------------
@pytest.mark.parametrize("tasks_file, config, dataset, width", [
    ("E_cifar100_50_50.yaml", "E_mudsc_resnet20_cifar100.yaml", "cifar100", 8),
    ("E_cifar10_5_5.yaml", "E_mudsc_resnet20x4_cifar10.yaml", "cifar10", 4)])
def test_experiment_E_tasks_are_five_pairs_of_class_halves_from_ten_initializations(tasks_file, config, dataset, width):
    """Pair p: the two halves of the class split seeded p, init seeds 2p and 2p+1; each directory
    name is the task name its datamodule reports (train_all writes OUTPUT/<name>, task.json the task)."""
    from pathlib import Path

    import yaml

    from src.finetune.train_all import read_tasks_file

    repo = Path(__file__).resolve().parents[2]
    cfg = yaml.safe_load((repo / "configs" / "finetune" / config).read_text())
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert data["dataset"] == dataset and model["width"] == width and model["embed_dim"] == 512
    tasks = read_tasks_file(repo / "configs" / "finetune" / "tasks" / tasks_file)
    assert len(tasks) == 10
    halves, seen_inits = {}, set()
    for i, (name, overrides) in enumerate(tasks.items()):
        pair, half = divmod(i, 2)
        assert set(overrides) == {"data.init_args.dataset", "data.init_args.split_seed", "data.init_args.subset",
                                  "model.init_args.init_seed"}
        args = {**data, **{k.removeprefix("data.init_args."): v for k, v in overrides.items() if k.startswith("data.")}}
        dm = CifarSubsetDataModule(**{k: args[k] for k in ("dataset", "subset", "num_subsets", "seed", "split_seed")})
        assert dm.task == name == f"{dataset}-split{pair}-{half}of2"
        halves[pair, half] = dm.class_ids
        seen_inits.add(overrides["model.init_args.init_seed"])
        assert overrides["model.init_args.init_seed"] == 2 * pair + half
    assert len(seen_inits) == 10  # no two models share an initialization
    num_classes = len(cifar_classes(dataset))
    for pair in range(5):
        a, b = halves[pair, 0], halves[pair, 1]
        assert not set(a) & set(b) and sorted(a + b) == list(range(num_classes))
        assert [a, b] == class_subsets(num_classes, 2, pair)
    assert len({tuple(sorted(halves[p, 0])) for p in range(5)}) == 5  # five different class splits
