"""Every permutation spec leaves its network's function unchanged under a random permutation
that respects its groups and ties, and a permutation that breaks them does change it."""
from __future__ import annotations

import copy

import pytest
import torch

from src.finetune.models.resnet import ResNet20
from src.permute.spec import Perm, PermutationSpec, inp, out, permute_state, random_permutations
from src.permute.specs import clip_vision_spec, mlp_spec, resnet20_spec

from .helpers import MLP, randomize_norms


def _permuted_copy(model, spec, perms):
    clone = copy.deepcopy(model)
    clone.load_state_dict(permute_state(spec, perms, model.state_dict()))
    return clone


def test_mlp_spec_function_invariance():
    g = torch.Generator().manual_seed(0)
    model = MLP(12, 8, 3, 5)
    spec = mlp_spec(12, 8, 3, 5)
    spec.check(model.state_dict())
    perms = random_permutations(spec, g)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    x = torch.randn(6, 12, generator=g)
    permuted = _permuted_copy(model, spec, perms)
    torch.testing.assert_close(permuted(x), model(x))
    # permuting a hidden layer's rows without its consumer's columns changes the function
    broken = dict(model.state_dict())
    broken["fc2.weight"] = broken["fc2.weight"][perms["h2"]]
    clone = _permuted_copy(model, spec, {})
    clone.load_state_dict(broken)
    assert not torch.allclose(clone(x), model(x))


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_resnet20_spec_function_invariance(norm):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = ResNet20(1, norm, 4, out_dim=6).eval()
    randomize_norms(model, g)
    spec = resnet20_spec(1, norm, 4)
    spec.check(model.state_dict())
    assert set(spec.axes) >= {k for k, v in model.state_dict().items() if v.is_floating_point() and v.dim() > 0} - {"proj.bias"}
    perms = random_permutations(spec, g)
    x = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(_permuted_copy(model, spec, perms)(x), model(x), rtol=1e-4, atol=1e-4)
    if norm == "group":  # a permutation that mixes channels of different groups is not allowed
        free = {p: torch.randperm(spec.perms[p].size, generator=g) for p in spec.perms}
        with torch.no_grad():
            assert not torch.allclose(_permuted_copy(model, spec, free)(x), model(x), rtol=1e-3, atol=1e-3)


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "vocab_size": 50, "max_position_embeddings": 8},
                        vision_config={"hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2,
                                       "num_attention_heads": 3, "image_size": 16, "patch_size": 8},
                        projection_dim=10)
    torch.manual_seed(0)
    return CLIPModel(config).eval()


def _image_embeds(model, x):
    return model.visual_projection(model.vision_model(pixel_values=x).pooler_output)


def test_clip_vision_spec_function_invariance_with_heads():
    model = _tiny_clip()
    g = torch.Generator().manual_seed(2)
    randomize_norms(model, g)
    vc = model.config.vision_config
    spec = clip_vision_spec(vc.hidden_size, vc.num_attention_heads, vc.intermediate_size, vc.num_hidden_layers)
    spec.check(model.state_dict())
    assert spec.perms["layers.0.qk"].group_size == 8 and spec.perms["layers.0.qk"].tie == spec.perms["layers.0.vo"].tie
    perms = random_permutations(spec, g)
    x = torch.randn(2, 3, 16, 16, generator=g)
    with torch.no_grad():
        expected = _image_embeds(model, x)
        torch.testing.assert_close(_image_embeds(_permuted_copy(model, spec, perms), x), expected,
                                   rtol=1e-4, atol=1e-5)
        # untied head orders (Q/K heads moved differently from V/O heads) change the function
        untied = dict(perms)
        heads = spec.perms["layers.0.vo"]
        order = torch.tensor([1, 2, 0])
        untied["layers.0.vo"] = torch.cat([int(h) * heads.group_size + torch.arange(heads.group_size) for h in order])
        untied["layers.0.qk"] = torch.arange(heads.size)
        assert not torch.allclose(_image_embeds(_permuted_copy(model, spec, untied), x), expected,
                                  rtol=1e-3, atol=1e-4)


def test_random_permutations_respect_groups_and_ties():
    spec = PermutationSpec({"a": Perm(12, 4, tie="t"), "b": Perm(12, 4, tie="t"), "c": Perm(5)},
                           {"w": (out("a"), inp("c")), "v": (out("b"),)})
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        perms = random_permutations(spec, g)
        for name in ("a", "b"):
            blocks = perms[name].view(3, 4) // 4
            assert (blocks == blocks[:, :1]).all()  # every group stays whole
        assert torch.equal(perms["a"].view(3, 4)[:, 0] // 4, perms["b"].view(3, 4)[:, 0] // 4)  # one head order


def test_spec_rejects_inconsistent_declarations():
    with pytest.raises(ValueError, match="unknown perm"):
        PermutationSpec({"a": Perm(4)}, {"w": (out("b"),)})
    with pytest.raises(ValueError, match="whole number of groups"):
        PermutationSpec({"a": Perm(6, 4)}, {})
    spec = PermutationSpec({"a": Perm(4)}, {"w": (out("a"), None)})
    with pytest.raises(ValueError, match="axis 0 has 3 units"):
        spec.check({"w": torch.zeros(3, 2)})
