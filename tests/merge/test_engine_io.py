"""Checkpoint I/O and the streaming engine: formats, naming, errors, atomicity, memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from src.merge import LowRank, MergeInputError, Sweep, merge, merge_state_dicts
from src.merge.__main__ import main as cli_main
from src.merge.sources import PeftAdapterReader, open_task
from src.safe_output import atomic_directory
from src.task_checkpoint import TaskInfo, write_task_info

from .helpers import base_model, full_task_state, save_lora_adapter


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ----- readers --------------------------------------------------------------------------
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_factors_and_scale_match_peft(tmp_path, use_rslora):
    """lora_alpha / r (and alpha / sqrt(r) for rsLoRA) is applied; factors are kept."""
    from peft import PeftModel

    base = base_model()
    path = save_lora_adapter(base, tmp_path / "a", seed=1, r=4, alpha=8, use_rslora=use_rslora)
    reader = open_task(path)
    assert isinstance(reader, PeftAdapterReader) and reader.kind == "lora"
    assert sorted(reader.keys()) == sorted(f"layers.{i}.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj"))
    upd = reader.load("layers.1.v_proj.weight")
    assert isinstance(upd, LowRank) and upd.rank == 4
    assert upd.scale == pytest.approx(8 / 2 if use_rslora else 8 / 4)
    merged = PeftModel.from_pretrained(base_model(), str(path)).merge_and_unload()
    expected = merged.state_dict()["layers.1.v_proj.weight"] - base.state_dict()["layers.1.v_proj.weight"]
    torch.testing.assert_close(upd.dense(), expected, atol=1e-6, rtol=1e-5)


def test_sharded_base_and_lightning_ckpt_prefix_are_aligned(tmp_path):
    base = base_model()
    sd = base.state_dict()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[:4]}, str(tmp_path / "b-1.safetensors"))
    save_file({k: sd[k] for k in keys[4:]}, str(tmp_path / "b-2.safetensors"))
    index = {"weight_map": {k: ("b-1.safetensors" if i < 4 else "b-2.safetensors") for i, k in enumerate(keys)}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tasks = [full_task_state(base, s) for s in (1, 2)]
    torch.save({"state_dict": {"model." + k: v for k, v in tasks[0].items()}, "epoch": 3}, tmp_path / "t0.ckpt")
    save_file(tasks[1], str(tmp_path / "t1.safetensors"))
    got = merge("average", [tmp_path / "t0.ckpt", tmp_path / "t1.safetensors"],
                base=tmp_path / "model.safetensors.index.json", progress=False).tensors
    want = merge_state_dicts("average", tasks, base=sd)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_task_checkpoint_directory_is_read(tmp_path):
    base = base_model()
    dirs = []
    for i in range(2):
        with atomic_directory(tmp_path / f"task{i}") as d:
            save_lora_adapter(base, d / "adapter", seed=10 + i)
            write_task_info(d, TaskInfo(task=f"t{i}", base_model="tiny", family="test", kind="lora", label_names=["a"]))
        dirs.append(tmp_path / f"task{i}")
    adapters = [save_lora_adapter(base, tmp_path / f"plain{i}", seed=10 + i) for i in range(2)]
    a = merge("knots", dirs, progress=False, params={"base_method": "ta"}).tensors
    b = merge("knots", adapters, progress=False, params={"base_method": "ta"}).tensors
    for k in a:
        torch.testing.assert_close(a[k].dense(), b[k].dense())


# ----- writers ------------------------------------------------------------------------
def test_merged_adapter_loads_in_peft_and_reproduces_merged_weights(tmp_path):
    from peft import PeftModel

    base = base_model()
    sd = base.state_dict()
    save_file(sd, str(tmp_path / "base.safetensors"))
    adapters = [save_lora_adapter(base, tmp_path / f"a{i}", seed=20 + i) for i in range(3)]
    params = {"base_method": "ties", "lam": 0.7, "density": 0.5, "trim_scope": "tensor", "sign_fill": "tensor"}
    out = merge("knots", adapters, output=tmp_path / "merged", params=params, progress=False)
    assert out.info["save_as"] == "adapter"
    assert (tmp_path / "merged" / "adapter_config.json").is_file()
    dense = merge("knots", adapters, base=tmp_path / "base.safetensors", save_as="safetensors", params=params,
                  progress=False).tensors
    loaded = PeftModel.from_pretrained(base_model(), str(tmp_path / "merged")).merge_and_unload().state_dict()
    for k in dense:
        torch.testing.assert_close(loaded[k], dense[k], atol=1e-5, rtol=1e-5)
    # and the module outputs agree
    x = torch.randn(3, 12)
    model = PeftModel.from_pretrained(base_model(), str(tmp_path / "merged"))
    ref = base_model()
    ref.load_state_dict({**sd, **dense})
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_output_is_sharded_with_index_and_keeps_dtype(tmp_path):
    base = base_model()
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in base.state_dict().items()}
    tasks = [{k: (v + 0.1).to(v.dtype) if v.is_floating_point() else v for k, v in sd.items()} for _ in range(2)]
    res = merge("average", tasks, base=sd, output=tmp_path / "out", max_shard_bytes=600, progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    loaded = {}
    for f in files:
        loaded.update(load_file(str(tmp_path / "out" / f)))
    assert loaded.keys() == sd.keys()
    assert all(loaded[k].dtype == sd[k].dtype for k in sd)
    torch.testing.assert_close(loaded["norm.weight"].float(), (sd["norm.weight"] + 0.1).to(torch.bfloat16).float())
    info = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert info["method"] == "average" and info["wall_time_s"] > 0 and info["peak_rss_bytes"] > 0
    assert res.output == tmp_path / "out" and not _leftovers(tmp_path)


# ----- bad inputs ----------------------------------------------------------------------
def _write(tmp_path, name, state):
    save_file(state, str(tmp_path / name))
    return tmp_path / name


def test_shape_mismatch_names_the_file_and_writes_nothing(tmp_path):
    base = base_model()
    good = _write(tmp_path, "good.safetensors", full_task_state(base, 1))
    bad_state = full_task_state(base, 2)
    bad_state["layers.0.q_proj.weight"] = torch.zeros(12, 13)
    bad = _write(tmp_path, "bad.safetensors", bad_state)
    with pytest.raises(MergeInputError, match=r"bad\.safetensors.*layers\.0\.q_proj\.weight.*shape \(12, 13\)"):
        merge("ties", [good, bad], base=base.state_dict(), output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_key_mismatch_and_different_lora_targets_are_named(tmp_path):
    base = base_model()
    s1, s2 = full_task_state(base, 1), full_task_state(base, 2)
    del s2["norm.bias"]
    p1, p2 = _write(tmp_path, "t1.safetensors", s1), _write(tmp_path, "t2.safetensors", s2)
    with pytest.raises(MergeInputError, match=r"t2\.safetensors: has different parameters.*missing \['norm\.bias'\]"):
        merge("average", [p1, p2], progress=False)
    a = save_lora_adapter(base, tmp_path / "qv", seed=1, targets=("q_proj", "v_proj"))
    b = save_lora_adapter(base, tmp_path / "qo", seed=2, targets=("q_proj", "out_proj"))
    with pytest.raises(MergeInputError, match=r"qo: targets different modules"):
        merge("knots", [a, b], progress=False)


def test_nan_in_a_late_tensor_leaves_no_output(tmp_path):
    base = base_model()
    s2 = full_task_state(base, 2)
    s2["norm.weight"][3] = float("nan")  # after several tensors were already written
    p1, p2 = _write(tmp_path, "t1.safetensors", full_task_state(base, 1)), _write(tmp_path, "t2.safetensors", s2)
    with pytest.raises(MergeInputError, match=r"t2\.safetensors: tensor 'norm\.weight' contains NaN or inf"):
        merge("average", [p1, p2], base=base.state_dict(), output=tmp_path / "out", max_shard_bytes=100, progress=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_unreadable_or_missing_inputs_are_named(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    ok = _write(tmp_path, "ok.safetensors", full_task_state(base_model(), 1))
    with pytest.raises(MergeInputError, match=r"junk\.safetensors: not a readable safetensors file"):
        merge("average", [ok, junk], progress=False)
    with pytest.raises(MergeInputError, match=r"nowhere\.safetensors: does not exist"):
        merge("average", [ok, tmp_path / "nowhere.safetensors"], progress=False)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{not json")
    with pytest.raises(MergeInputError, match=r"adapter_config\.json: unreadable"):
        merge("knots", [tmp_path / "adapter"], progress=False)


def test_task_models_from_different_bases_are_refused(tmp_path):
    base = base_model()
    dirs = []
    for i, base_id in enumerate(["model-a", "model-b"]):
        with atomic_directory(tmp_path / f"t{i}") as d:
            save_lora_adapter(base, d / "adapter", seed=i)
            write_task_info(d, TaskInfo(task=f"t{i}", base_model=base_id, family="x", kind="lora", label_names=["a"]))
        dirs.append(tmp_path / f"t{i}")
    with pytest.raises(MergeInputError, match=r"t1.*another base model"):
        merge("knots", dirs, progress=False)


def test_methods_that_need_a_base_say_so():
    base = base_model()
    with pytest.raises(ValueError, match="needs a base model"):
        merge_state_dicts("ties", [full_task_state(base, 1), full_task_state(base, 2)])


# ----- engine behaviour --------------------------------------------------------------
def test_global_reductions_streamed_from_disk_equal_in_memory(tmp_path):
    """Global TIES re-reads dense inputs per pass; the result equals the cached route."""
    base = base_model()
    states = [full_task_state(base, s) for s in (1, 2, 3)]
    paths = [_write(tmp_path, f"t{i}.safetensors", s) for i, s in enumerate(states)]
    params = {"lam": 1.0, "density": 0.3, "trim_scope": "global", "sign_fill": "global"}
    streamed = merge("ties", paths, base=base.state_dict(), params=params, progress=False, cache_states=False).tensors
    cached = merge("ties", paths, base=base.state_dict(), params=params, progress=False, cache_states=True).tensors
    for k in cached:
        torch.testing.assert_close(streamed[k], cached[k], atol=0, rtol=0)


def test_sweep_prepares_each_tensor_once_and_matches_single_merges():
    base = base_model()
    adapters = {}
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        adapters[i] = {k: LowRank(torch.randn(v.shape[0], 3, generator=g), torch.randn(3, v.shape[1], generator=g), 0.5)
                       for k, v in base.state_dict().items() if k.endswith("proj.weight")}
    tasks = list(adapters.values())
    sweep = Sweep("knots", tasks, progress=False)
    grid = {"lam": [0.3, 0.6], "density": [0.2, 0.5]}
    fixed = {"base_method": "ties"}
    results = list(sweep.run(grid, fixed=fixed, as_updates=True))
    assert len(results) == 4
    assert sweep.prepare_calls == len(tasks[0])  # one SVD alignment per tensor for the whole grid
    for point, merged in results:
        single = merge("knots", tasks, params={**fixed, **point}, progress=False).tensors
        for k in single:
            torch.testing.assert_close(merged[k].dense(), single[k].dense(), atol=1e-10, rtol=1e-8)


def test_cli_config_with_overrides(tmp_path, capsys):
    base = base_model()
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    tasks = [str(_write(tmp_path, f"t{i}.safetensors", full_task_state(base, i))) for i in range(2)]
    rc = cli_main(["--config", "configs/merge/ties.yaml", "--base", str(tmp_path / "base.safetensors"),
                   "--tasks", json.dumps(tasks), "--output", str(tmp_path / "out"), "--params.density", "0.5",
                   "--progress", "false"])
    assert rc == 0
    info = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert info["method"] == "ties" and info["params"]["density"] == 0.5
    direct = merge("ties", tasks, base=tmp_path / "base.safetensors", params=info["params"], progress=False).tensors
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k in direct:
        torch.testing.assert_close(written[k], direct[k])
    with pytest.raises(SystemExit):
        cli_main(["--config", "configs/merge/ties.yaml", "--tasks", json.dumps(tasks), "--output",
                  str(tmp_path / "o2"), "--params.not_a_param", "1"])
    assert not (tmp_path / "o2").exists()


def test_streaming_merge_peak_memory_below_one_checkpoint(tmp_path):
    """The CLI merges five 64 MiB checkpoints with TIES in less extra memory than ONE of them."""
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(512, 512, generator=g) for i in range(64)}
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for t in range(5):
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(tmp_path / f"t{t}.safetensors"))
        paths.append(str(tmp_path / f"t{t}.safetensors"))
    del base
    ckpt_bytes = os.path.getsize(paths[0])
    proc = subprocess.run([sys.executable, "-m", "src.merge", "--config", "configs/merge/ties.yaml",
                           "--base", str(tmp_path / "base.safetensors"), "--tasks", json.dumps(paths),
                           "--output", str(tmp_path / "out"), "--params.trim_scope", "tensor",
                           "--params.sign_fill", "tensor", "--progress", "false"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr
    info = json.loads((tmp_path / "out" / "merge.json").read_text())
    extra = info["peak_rss_bytes"] - info["rss_at_start_bytes"]
    assert extra < ckpt_bytes, f"merge used {extra / 2**20:.0f} MiB extra; one checkpoint is {ckpt_bytes / 2**20:.0f} MiB"
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("method,params", [("task_arithmetic", {"lam": 0.4}), ("average", {}),
                                           ("task_arithmetic", {"lam": 0.8, "reduce": "mean"})])
def test_lora_task_arithmetic_stays_factored_and_exports_an_adapter(tmp_path, method, params):
    """TA / average of LoRA inputs is a concatenation of factors: saved as a PEFT adapter."""
    from peft import PeftModel

    base = base_model()
    adapters = [save_lora_adapter(base, tmp_path / f"a{i}", seed=40 + i, r=2 + i) for i in range(3)]
    res = merge(method, adapters, output=tmp_path / "m", params=params, progress=False)
    assert res.info["save_as"] == "adapter"
    updates = [{k: open_task(a).load(k).dense() for k in open_task(a).keys()} for a in adapters]
    coef = params.get("lam", 1.0) / (3 if method == "average" or params.get("reduce") == "mean" else 1)
    loaded = PeftModel.from_pretrained(base_model(), str(tmp_path / "m")).merge_and_unload().state_dict()
    for k in updates[0]:
        want = base.state_dict()[k] + coef * sum(u[k] for u in updates)
        torch.testing.assert_close(loaded[k], want, atol=1e-5, rtol=1e-5)


def test_majority_sign_pass_runs_only_when_an_entry_needs_it(monkeypatch):
    """TIES' model-wide sign fill is deferred: skipped on ordinary data, computed (and used)
    when trimmed values cancel exactly."""
    from src.merge import reductions as statistics

    passes = []
    real = statistics.SignSum.start_pass
    monkeypatch.setattr(statistics.SignSum, "start_pass", lambda self: passes.append(1) or real(self))
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.zeros(4, 5), "b": torch.zeros(6)}
    tasks = [{k: torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    params = {"lam": 1.0, "density": 1.0, "trim_scope": "tensor", "sign_fill": "global"}
    merge_state_dicts("ties", tasks, base=base, **params)
    assert passes == []
    # tensor "a" is mostly negative in both tasks; tensor "b" has one exact cancellation
    tasks = [{"a": -torch.ones(4, 5), "b": torch.tensor([1.0, 2, 3, 4, 5, 2.5])},
             {"a": -torch.ones(4, 5), "b": torch.tensor([1.0, 2, 3, 4, 5, -2.5])}]
    merged = merge_state_dicts("ties", tasks, base=base, **params)
    assert len(passes) >= 1
    # elected sign of b[5] is 0: filled with the model-wide majority (-1), not b's own (+1)
    assert merged["b"][5].item() == pytest.approx(-2.5)
    assert merged["b"][:5].tolist() == [1.0, 2, 3, 4, 5]
    per_tensor = merge_state_dicts("ties", tasks, base=base, **{**params, "sign_fill": "tensor"})
    assert per_tensor["b"][5].item() == pytest.approx(2.5)


def test_base_tensors_are_read_only_when_needed(tmp_path):
    """LoRA merges into an adapter never read W0; into merged weights, once per tensor."""
    from src.merge.sources import StateDictReader

    class CountingBase(StateDictReader):
        loads: list = []

        def load(self, key):
            self.loads.append(key)
            return super().load(key)

    base = base_model()
    adapters = [save_lora_adapter(base, tmp_path / f"a{i}", seed=60 + i) for i in range(2)]
    for save_as, expected in (("adapter", 0), ("safetensors", 1)):
        counting = CountingBase(base.state_dict(), "<base>", kind="full")
        counting.loads = []
        merge("knots", adapters, base=counting, save_as=save_as, progress=False)
        names = open_task(adapters[0]).keys()
        assert all(counting.loads.count(n) == expected for n in names), (save_as, counting.loads)
