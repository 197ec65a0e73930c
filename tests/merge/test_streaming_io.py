"""Positioned-read safetensors I/O and the streamed (chunked, fused) linear merges."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from src.merge import MergeEngine, MergeInputError, Sweep, merge
from src.merge import streaming as streaming_module
from src.merge.streaming import StreamedTensor
from src.merge.sources import SafetensorsReader

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool]


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for dt in DTYPES:
        name = str(dt).split(".")[-1]
        if dt.is_floating_point:
            out[f"{name}.w"] = torch.randn(37, 11, generator=g).to(dt)
        elif dt == torch.bool:
            out[f"{name}.w"] = torch.randint(0, 2, (5, 3), generator=g).bool()
        else:
            out[f"{name}.w"] = torch.randint(0, 100, (13,), generator=g).to(dt)
    out["scalar"] = torch.tensor(3.5, dtype=torch.bfloat16)
    out["empty"] = torch.zeros(0, 4)
    return out


def _sharded(tmp_path: Path, state: dict, n: int = 3) -> Path:
    keys = sorted(state)
    weight_map = {}
    for i in range(n):
        part = {k: state[k] for k in keys[i::n]}
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(part, str(tmp_path / file))
        weight_map.update({k: file for k in part})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def _mapped(path: Path) -> bool:
    with open("/proc/self/maps") as f:
        return any(str(path) in line for line in f)


# ----- reader -------------------------------------------------------------------------------
def test_reader_returns_what_safetensors_loads_every_dtype(tmp_path):
    state = _state()
    save_file(state, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    want = load_file(str(tmp_path / "m.safetensors"))
    reader = SafetensorsReader(tmp_path / "m.safetensors")
    assert sorted(reader.keys()) == sorted(want)
    for k, v in want.items():
        got = reader.load(k)
        assert got.dtype == v.dtype == reader.dtype(k) and got.shape == v.shape == reader.shape(k)
        assert torch.equal(got.view(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k  # bit for bit


def test_reader_of_a_sharded_checkpoint_and_element_ranges(tmp_path):
    state = _state(1)
    reader = SafetensorsReader(_sharded(tmp_path, state))
    assert len({reader._where[k][0] for k in reader.keys()}) == 3
    for k, v in state.items():
        assert torch.equal(reader.load(k), v)
        flat = v.reshape(-1)
        for start, stop in ((0, flat.numel()), (1, flat.numel() - 2), (5, 6)):
            if stop <= start or stop > flat.numel():
                continue
            out = torch.empty(stop - start, dtype=v.dtype)
            reader.read_into(k, start, out)
            assert torch.equal(out, flat[start:stop]), (k, start, stop)
    with pytest.raises(ValueError, match="do not fit"):
        reader.read_into("float32.w", 400, torch.empty(10))  # 407 elements: past the end
    with pytest.raises(ValueError, match="do not fit"):
        reader.read_into("float32.w", 0, torch.empty(10, dtype=torch.float16))  # wrong dtype
    reader.close()


def test_reader_never_maps_the_file(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.randn(1 << 20)}, str(path))
    reader = SafetensorsReader(path)
    x = reader.load("w")
    assert x.shape == (1 << 20,) and not _mapped(path)
    assert torch.equal(x, load_file(str(path))["w"])


def test_corrupt_files_name_the_file(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(MergeInputError, match="junk.safetensors: not a readable safetensors file"):
        SafetensorsReader(junk)
    cut = tmp_path / "cut.safetensors"
    save_file({"a": torch.randn(100), "b": torch.randn(100)}, str(cut))
    data = cut.read_bytes()
    cut.write_bytes(data[:-10])
    with pytest.raises(MergeInputError, match="cut.safetensors: not a readable safetensors file"):
        SafetensorsReader(cut)
    # truncated after the reader opened it (a copy still being written, a full disk)
    late = tmp_path / "late.safetensors"
    late.write_bytes(data)
    reader = SafetensorsReader(late)
    assert torch.equal(reader.load("a"), load_file(str(cut.with_name("late.safetensors")))["a"])
    os.truncate(late, len(data) - 200)
    with pytest.raises(MergeInputError, match=r"late.safetensors: is truncated: tensor 'b'"):
        reader.load("b")


# ----- streamed linear merges -----------------------------------------------------------------
def _models(tmp_path: Path, dtype: torch.dtype, n: int = 3):
    g = torch.Generator().manual_seed(0)
    shapes = {"emb.weight": (50, 24), "layer.weight": (24, 24), "norm.weight": (24,), "empty.weight": (0, 3)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    base["pos"] = torch.arange(7)
    save_file(base, str(tmp_path / "base.safetensors"))
    tasks = []
    for t in range(n):
        s = {k: (v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(dtype)
             if v.is_floating_point() else v for k, v in base.items()}
        tasks.append(s)
        save_file(s, str(tmp_path / f"t{t}.safetensors"))
    return base, tasks, tmp_path / "base.safetensors", [tmp_path / f"t{t}.safetensors" for t in range(n)]


JOBS = [("average", False, {}), ("average", True, {}), ("task_arithmetic", True, {}),
        ("task_arithmetic", True, {"lam": 0.3, "reduce": "mean"}), ("task_arithmetic", True, {"lam": 0.7})]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("chunk", [7, 1 << 18])
def test_streamed_merge_is_bit_identical_to_the_loaded_path(tmp_path, monkeypatch, dtype, chunk):
    """Files take the streamed path, state dicts the loaded one: same bits, chunk size or not."""
    monkeypatch.setattr(streaming_module, "STREAM_CHUNK", chunk)
    base, tasks, base_path, task_paths = _models(tmp_path, dtype)
    for method, with_base, params in JOBS:
        streamed = merge(method, task_paths, base=base_path if with_base else None, params=params, progress=False).tensors
        loaded = merge(method, tasks, base=base if with_base else None, params=params, progress=False).tensors
        assert streamed.keys() == loaded.keys()
        for k in loaded:
            assert streamed[k].dtype == loaded[k].dtype, (method, k)
            assert torch.equal(streamed[k].view(torch.uint8), loaded[k].view(torch.uint8)), (method, params, k)


def test_streamed_group_only_for_linear_methods_on_safetensors(tmp_path):
    base, tasks, base_path, task_paths = _models(tmp_path, torch.bfloat16)
    group = MergeEngine("task_arithmetic", task_paths, base=base_path, progress=False).group("layer.weight")
    assert all(isinstance(u, StreamedTensor) for u in group.updates) and isinstance(group.base, StreamedTensor)
    assert not isinstance(MergeEngine("ties", task_paths, base=base_path, progress=False).group("layer.weight").updates[0],
                          StreamedTensor)
    assert not isinstance(MergeEngine("average", tasks, progress=False).group("layer.weight").updates[0], StreamedTensor)


def test_streamed_sweep_updates_match_the_loaded_path(tmp_path):
    base, tasks, base_path, task_paths = _models(tmp_path, torch.bfloat16)
    grid = {"lam": [0.3, 1.0]}
    streamed = list(Sweep("task_arithmetic", task_paths, base=base_path, progress=False).run(grid, as_updates=True))
    loaded = list(Sweep("task_arithmetic", tasks, base=base, progress=False).run(grid, as_updates=True))
    for (p1, a), (p2, b) in zip(streamed, loaded):
        assert p1 == p2 and a.keys() == b.keys()
        for k in b:
            assert a[k].dtype == b[k].dtype == torch.float32 and torch.equal(a[k], b[k])


@pytest.mark.parametrize("where", ["base", "t1", "t1+t2", "base+t2"])
@pytest.mark.parametrize("chunk", [7, 1 << 18])
def test_streamed_nan_names_the_same_file_as_the_loaded_path(tmp_path, monkeypatch, where, chunk):
    monkeypatch.setattr(streaming_module, "STREAM_CHUNK", chunk)
    base, tasks, base_path, task_paths = _models(tmp_path, torch.bfloat16)
    bad = {"base": base, "t1": tasks[1], "t2": tasks[2]}
    for i, part in enumerate(where.split("+")):
        bad[part]["emb.weight"][40 - 30 * i, 3] = float("nan") if i == 0 else float("inf")  # late in t1, early in t2
        save_file(bad[part], str(base_path if part == "base" else task_paths[int(part[1])]))
    first = where.split("+")[0]
    name = "base" if first == "base" else first
    for method, with_base, params in JOBS:
        if not with_base and first == "base":
            continue
        with pytest.raises(MergeInputError, match=rf"{name}\.safetensors: tensor 'emb\.weight' contains NaN or inf"):
            merge(method, task_paths, base=base_path if with_base else None, params=params, progress=False,
                  output=tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_finite_inputs_that_overflow_are_not_input_errors(tmp_path):
    """A float32 sum past the range is the merge's doing (the output check reports it), not
    a bad input: the streamed path must not blame a file, exactly like the loaded path."""
    x = {"w": torch.full((10,), 3e38)}
    zero = {"w": torch.zeros(10)}
    save_file(x, str(tmp_path / "a.safetensors"))
    save_file(x, str(tmp_path / "b.safetensors"))
    save_file(zero, str(tmp_path / "z.safetensors"))
    for tasks, base in (([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "z.safetensors"), ([x, x], zero)):
        try:
            out = merge("task_arithmetic", tasks, base=base, progress=False).tensors["w"]
            assert torch.isinf(out).all()
        except MergeInputError as e:  # pragma: no cover - the failure this test guards against
            pytest.fail(f"blamed an input: {e}")
        except ValueError as e:
            assert "merged tensor 'w'" in str(e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_finite_check_catches_every_nan_and_inf_and_passes_overflowing_sums(tmp_path, dtype):
    engine = MergeEngine("average", [{"w": torch.zeros(3)}], progress=False)
    big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)
    assert not torch.isfinite(big.sum())
    engine._check_finite(big, "p", "w")  # every entry finite: no error, though the sum overflows
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in (0, 517, 999):
            x = torch.randn(1000).to(dtype)
            x[pos] = bad
            with pytest.raises(MergeInputError, match="p: tensor 'w' contains NaN or inf"):
                engine._check_finite(x, "p", "w")
    engine._check_finite(torch.arange(5), "p", "w")  # integer tensors are not checked


def test_threads_follow_the_free_cores_unless_omp_num_threads_is_set(monkeypatch):
    from src.merge import memory

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        assert 0.0 <= memory.free_cores(0.05) <= cores + 1e-9
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(memory, "_cgroup_cpu_limit", lambda: None)
        monkeypatch.setattr(memory, "free_cores", lambda interval=0.1: 0.2)  # every core busy
        assert memory.use_free_cores() == 1 == torch.get_num_threads()
        monkeypatch.setattr(memory, "free_cores", lambda interval=0.1: 1000.0)  # never above the cores
        assert memory.use_free_cores() == cores == torch.get_num_threads()
        monkeypatch.setattr(memory, "_cgroup_cpu_limit", lambda: 0.5)  # a CPU quota caps it
        assert memory.use_free_cores() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice is kept
        torch.set_num_threads(cores)
        assert memory.use_free_cores() == cores == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
