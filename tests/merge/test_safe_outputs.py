"""Merge outputs never destroy data, and no broken or unloadable model is written as a success."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from src.merge import get_method, merge
from src.merge.__main__ import main as cli_main
from src.merge.errors import MergeInputError
from src.merge.sources import PeftAdapterReader
from src.safe_output import OutputError, atomic_directory, check_output
from src.task_checkpoint import TaskCheckpointError, TaskInfo, read_task_info, write_task_info
from src.task_statistics import kind_path

from .helpers import base_model, full_task_state, save_lora_adapter

REPO = Path(__file__).resolve().parents[2]


def _tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: 'unchanged' means byte for byte."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _hf_base(directory: Path, seed: int = 0) -> Path:
    """A base model directory as Hugging Face writes it (weights + config + tokenizer file)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(base_model(seed).state_dict(), str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    (directory / "tokenizer.json").write_text("{}")
    return directory


def _task_dirs(root: Path, n: int = 3, base_id: str = "tiny") -> list[str]:
    """LoRA task checkpoints as the finetune stage writes them (the demo's shape)."""
    base = base_model()
    dirs = []
    for i in range(n):
        with atomic_directory(root / f"task{i}") as d:
            save_lora_adapter(base, d / "adapter", seed=10 + i)
            write_task_info(d, TaskInfo(task=f"t{i}", base_model=base_id, family="test", kind="lora", label_names=["a"]))
        dirs.append(str(root / f"task{i}"))
    return dirs


def _write_statistics(tasks: list[str], kinds, tag: str) -> None:
    """Random data statistics of the right shapes for every LoRA-targeted weight of each task."""
    shapes = {k: v.shape for k, v in base_model().state_dict().items() if k.endswith(("q_proj.weight", "v_proj.weight"))}
    for i, task in enumerate(tasks):
        g = torch.Generator().manual_seed(100 + i)
        for kind in kinds:
            tensors = {}
            for name, (o, n_in) in shapes.items():
                if kind == "fisher":
                    tensors[name] = torch.rand(o, n_in, generator=g)
                else:
                    k = o if kind == "kfac_out" else n_in
                    m = torch.randn(k, k, generator=g)
                    tensors[name] = m @ m.T / k + 0.1 * torch.eye(k)
            path = kind_path(task, tag, kind)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(path))


def _cli(*args) -> int:
    return cli_main([*map(str, args), "--progress", "false"])


# ----- 1. never delete what the user did not ask to replace ------------------------------
@pytest.mark.parametrize("where", ["task", "adapter", "base", "inputs_parent", "inside_task", "cwd", "dot", "empty"])
def test_output_that_is_contains_or_lies_in_an_input_is_refused(tmp_path, monkeypatch, capsys, where):
    root = tmp_path / "ckpt"
    tasks = _task_dirs(root)
    base = _hf_base(tmp_path / "pretrained")
    (root / "notes.txt").write_text("my notes")
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    output = {"task": tasks[0], "adapter": f"{tasks[1]}/adapter", "base": base, "inputs_parent": root,
              "inside_task": f"{tasks[0]}/merged", "cwd": tmp_path, "dot": ".", "empty": ""}[where]
    rc = _cli("--method", "ties", "--base", base, "--tasks", json.dumps(tasks), "--output", output)
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert _tree(tmp_path) == before  # nothing replaced, nothing half-written or hidden left


def test_foreign_non_empty_output_needs_overwrite_and_inputs_never_can(tmp_path, capsys):
    tasks = _task_dirs(tmp_path / "ckpt", n=2)
    results = tmp_path / "results"
    results.mkdir()
    (results / "table.md").write_text("precious")
    assert _cli("--method", "knots", "--tasks", json.dumps(tasks), "--output", results) == 2
    assert "--overwrite" in capsys.readouterr().err and (results / "table.md").read_text() == "precious"
    # an input is refused even with --overwrite
    assert _cli("--method", "knots", "--tasks", json.dumps(tasks), "--output", tasks[0], "--overwrite", "true") == 2
    assert read_task_info(tasks[0]).task == "t0"
    # with --overwrite a foreign directory is replaced, and the user is told
    assert _cli("--method", "knots", "--tasks", json.dumps(tasks), "--output", results, "--overwrite", "true") == 0
    assert "replacing the existing directory" in capsys.readouterr().err
    assert (results / "merge.json").is_file() and not (results / "table.md").exists()
    # an earlier merge output is replaced without --overwrite, with a note
    assert _cli("--method", "knots", "--tasks", json.dumps(tasks), "--output", results) == 0
    assert "replacing the earlier output" in capsys.readouterr().err


def test_an_existing_file_as_output_is_refused(tmp_path):
    base = base_model()
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    tasks = [str(tmp_path / f"t{i}.safetensors") for i in range(2)]
    for i, t in enumerate(tasks):
        save_file(full_task_state(base, i), t)
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match="is the input"):
        merge("ties", tasks, base=tmp_path / "base.safetensors", output=tasks[0], progress=False, overwrite=True)
    with pytest.raises(OutputError, match="contains the input"):
        merge("ties", tasks, base=tmp_path / "base.safetensors", output=tmp_path, progress=False, overwrite=True)
    assert _tree(tmp_path) == before


# ----- 2. every shipped config runs from the CLI -------------------------------------------
@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs" / "merge").glob("*.yaml")))
def test_every_merge_config_runs_from_the_cli(tmp_path, config):
    spec = __import__("yaml").safe_load((REPO / "configs/merge" / config).read_text())
    method = spec["method"]
    tasks = _task_dirs(tmp_path / "ckpt", n=2 if method == "slerp" else 3)
    base = _hf_base(tmp_path / "pretrained")
    out = tmp_path / "merged"
    m = get_method(method)
    needed = m.required_statistics(m.make_params(**spec["params"]))  # data-dependent methods: a statistics tag
    if needed:
        _write_statistics(tasks, needed, "train-n4-seed0")
    extra = ["--statistics", "train-n4-seed0"] if needed else []
    rc = _cli("--config", REPO / "configs/merge" / config, "--base", base, "--tasks", json.dumps(tasks), "--output", out,
              *extra)
    assert rc == 0
    info = json.loads((out / "merge.json").read_text())
    assert info["method"] == method and "README.md" in {p.name for p in out.iterdir()}
    assert {k: info["params"][k] for k in spec["params"]} == spec["params"]  # the config's values were used
    # what was written is the API's merge with the config's hyperparameters
    direct = merge(method, tasks, base=base, params=info["params"], save_as=info["save_as"], progress=False,
                   statistics=info["statistics"]).tensors
    if info["save_as"] == "adapter":
        written = PeftAdapterReader(out)
        assert set(written.keys()) == set(direct)
        for k, v in direct.items():
            torch.testing.assert_close(written.load(k).dense(), v.dense().to(written.dtype(k)))
    else:
        assert info["complete_model"] is True
        written = load_file(str(out / "model.safetensors"))
        assert set(written) == set(load_file(str(base / "model.safetensors")))
        for k, v in direct.items():
            torch.testing.assert_close(written[k], v)
            assert torch.isfinite(written[k]).all()


def test_methods_without_hyperparameters_run_with_method_flag(tmp_path):
    tasks = _task_dirs(tmp_path / "ckpt", n=2)
    for method in ("average", "mlerp"):
        assert _cli("--method", method, "--base", _hf_base(tmp_path / "pretrained"), "--tasks", json.dumps(tasks),
                    "--output", tmp_path / method) == 0


# ----- 3. no broken result with exit code 0 ------------------------------------------------
def test_non_finite_hyperparameters_are_refused(tmp_path, capsys):
    base = _hf_base(tmp_path / "pretrained")
    tasks = _task_dirs(tmp_path / "ckpt", n=2)
    assert _cli("--method", "task_arithmetic", "--base", base, "--tasks", json.dumps(tasks), "--output",
                tmp_path / "out", "--params.lam", "1e400") == 2
    assert "not a finite number" in capsys.readouterr().err and not (tmp_path / "out").exists()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            merge("task_arithmetic", tasks, base=base, params={"lam": bad}, progress=False)


def test_nan_in_the_base_is_caught_on_the_lora_plus_base_path(tmp_path):
    state = base_model().state_dict()
    state["layers.0.q_proj.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "base.safetensors"))
    tasks = _task_dirs(tmp_path / "ckpt", n=2)
    with pytest.raises(MergeInputError, match="base.safetensors: tensor 'layers.0.q_proj.weight' contains NaN"):
        merge("knots", tasks, base=tmp_path / "base.safetensors", output=tmp_path / "out", save_as="safetensors",
              progress=False)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_merge_that_overflows_the_output_dtype_is_refused(tmp_path):
    base = {k: v.half() for k, v in base_model().state_dict().items()}
    tasks = [{k: (v + 60000.0 if v.is_floating_point() else v) for k, v in base.items()} for _ in range(2)]
    with pytest.raises(ValueError, match="NaN or inf in torch.float16"):
        merge("task_arithmetic", tasks, base=base, output=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_wrong_ckpt_prefix_is_an_error_not_an_empty_model(tmp_path):
    base = base_model()
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    for i in range(2):
        torch.save({"state_dict": {f"model.{k}": v for k, v in full_task_state(base, i).items()}}, tmp_path / f"t{i}.ckpt")
    tasks = [str(tmp_path / f"t{i}.ckpt") for i in range(2)]
    with pytest.raises(MergeInputError, match="t0.ckpt: holds no tensor whose name starts with --ckpt_prefix 'net.'"):
        merge("ties", tasks, base=tmp_path / "base.safetensors", ckpt_prefix="net.", output=tmp_path / "o", progress=False)
    merged = merge("ties", tasks, base=tmp_path / "base.safetensors", ckpt_prefix="model.", progress=False).tensors
    assert len(merged) == len(base.state_dict())


def test_without_a_base_the_output_dtype_holds_every_input(tmp_path):
    state = base_model().state_dict()
    fp16 = {k: v.half() for k, v in state.items()}
    big = {k: (v * 1e6 if v.is_floating_point() else v) for k, v in state.items()}  # beyond float16's range
    out = merge("average", [fp16, big], output=tmp_path / "out", progress=False)
    written = load_file(str(out.output / "model.safetensors"))
    key = "layers.0.q_proj.weight"
    assert written[key].dtype == torch.float32 and torch.isfinite(written[key]).all()
    torch.testing.assert_close(written[key], (fp16[key].float() + big[key]) / 2)


def test_duplicate_task_paths_are_refused(tmp_path):
    tasks = _task_dirs(tmp_path / "ckpt", n=2)
    with pytest.raises(MergeInputError, match="is given twice"):
        merge("knots", [tasks[0], tasks[1], tasks[0] + "/"], progress=False)


# ----- 4. different bases are caught everywhere --------------------------------------------
def test_plain_adapters_naming_different_bases_are_refused(tmp_path):
    base = base_model()
    a = save_lora_adapter(base, tmp_path / "a", seed=1)
    b = save_lora_adapter(base, tmp_path / "b", seed=2)
    for path, name in ((a, "org/model-a"), (b, "org/model-b")):
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = name
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeInputError, match="another base model"):
        merge("knots", [a, b], progress=False)
    task = _task_dirs(tmp_path / "ckpt", n=1, base_id="org/model-a")[0]
    merge("knots", [task, a], progress=False)  # same base: fine
    with pytest.raises(MergeInputError, match="another base model"):
        merge("knots", [task, b], progress=False)


def test_cached_base_path_and_its_hub_id_are_the_same_base():
    from src.merge.base_ids import canonical_base

    cached = "/root/.cache/huggingface/hub/models--org--name/snapshots/abc123"
    assert canonical_base(cached) == canonical_base("org/name") == "org/name"


# ----- 5. no debris ------------------------------------------------------------------------
def test_sigterm_mid_write_leaves_nothing(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from src.safe_output import atomic_directory
        with atomic_directory({str(tmp_path / 'out')!r}) as tmp:
            (tmp / "part").write_text("x")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


def test_stale_debris_of_killed_runs_is_cleaned_or_restored(tmp_path, capsys):
    dead = 2 ** 22 + 12345  # above the default pid_max of 4194304: no such process
    (tmp_path / f".out.{dead}.abc.tmp").mkdir()
    (tmp_path / f".out.{dead}.abc.tmp" / "half.safetensors").write_text("x")
    (tmp_path / f".out.old-{dead}").mkdir()
    (tmp_path / f".out.old-{dead}" / "merge.json").write_text("{}")  # killed between the two renames
    with atomic_directory(tmp_path / "new") as d:
        (d / "f").write_text("1")
    with atomic_directory(tmp_path / "out") as d:
        # the earlier output was restored before this run, then is replaced when it completes
        assert (tmp_path / "out" / "merge.json").is_file()
        (d / "f").write_text("2")
    err = capsys.readouterr().err
    assert "removed" in err and "restored" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]
    assert (tmp_path / "out" / "f").read_text() == "2"


def test_losing_a_rename_race_is_a_clear_error_and_leaves_theirs(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="another process wrote this output"):
        with atomic_directory(target) as d:
            (d / "mine").write_text("1")
            target.mkdir()
            (target / "theirs").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "theirs").is_file()


# ----- 6. outputs follow the umask ---------------------------------------------------------
def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        tasks = _task_dirs(tmp_path / "ckpt", n=2)
        out = merge("knots", tasks, output=tmp_path / "merged", progress=False).output
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert (Path(tasks[0]).stat().st_mode & 0o777) == 0o755
    assert ((out / "merge.json").stat().st_mode & 0o777) == 0o644


# ----- 7. every error names the file and the problem ---------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("r", 0, "r must be a positive integer"),
    ("lora_alpha", "sixteen", "lora_alpha must be a positive number"),
    ("rank_pattern", [1, 2], "rank_pattern must be a mapping"),
    ("use_rslora", "yes", "use_rslora must be true or false"),
    ("r", 2, "says rank 2"),
])
def test_malformed_adapter_config_is_named(tmp_path, field, value, message):
    a = save_lora_adapter(base_model(), tmp_path / "a", seed=1)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg[field] = value
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeInputError, match=message) as e:
        merge("knots", [a], progress=False)
    assert "adapter_config.json" in str(e.value)


def test_adapter_config_that_is_a_list_is_named(tmp_path):
    a = save_lora_adapter(base_model(), tmp_path / "a", seed=1)
    (a / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(MergeInputError, match="adapter_config.json: must hold a JSON object"):
        merge("knots", [a], progress=False)


def test_bad_format_version_in_task_json_is_named(tmp_path):
    task = Path(_task_dirs(tmp_path, n=1)[0])
    data = json.loads((task / "task.json").read_text())
    data["format_version"] = "one"
    (task / "task.json").write_text(json.dumps(data))
    with pytest.raises(TaskCheckpointError, match="format_version must be a positive integer"):
        read_task_info(task)
    with pytest.raises(MergeInputError, match="task.json: format_version"):
        merge("knots", [task], progress=False)


@pytest.mark.parametrize("args,message", [
    (["--config", "no/such/config.yaml"], "no/such/config.yaml: config file does not exist"),
    (["--method", "knots", "--device", "gpu0"], "invalid device 'gpu0'"),
    (["--method", "slerp", "--params.dot_threshold", "1.5"], "dot_threshold is a |cosine| in [0, 1]"),
])
def test_cli_user_mistakes_are_one_line_errors(tmp_path, capsys, args, message):
    tasks = _task_dirs(tmp_path / "ckpt", n=2)
    rc = _cli(*args, "--tasks", json.dumps(tasks), "--output", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_unwritable_output_and_a_full_disk_are_named_before_merging(tmp_path, monkeypatch, capsys):
    tasks = _task_dirs(tmp_path / "ckpt", n=2)
    (tmp_path / "afile").write_text("x")
    assert _cli("--method", "knots", "--tasks", json.dumps(tasks), "--output", tmp_path / "afile" / "out") == 2
    assert "afile: cannot create the output's parent directory" in capsys.readouterr().err

    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 100))
    base = _hf_base(tmp_path / "pretrained")
    assert _cli("--method", "ties", "--base", base, "--tasks", json.dumps(tasks), "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "but only 100 bytes are free on its filesystem" in err and not (tmp_path / "out").exists()


# ----- 9. the recorded base is the default; --list says what each method needs ------------
def test_base_defaults_to_the_one_task_json_records(tmp_path, capsys):
    base = _hf_base(tmp_path / "pretrained")
    tasks = _task_dirs(tmp_path / "ckpt", n=2, base_id=str(base))
    assert _cli("--method", "ties", "--tasks", json.dumps(tasks), "--output", tmp_path / "out") == 0
    assert "recorded by the task models" in capsys.readouterr().err
    info = json.loads((tmp_path / "out" / "merge.json").read_text())
    assert info["base"] == str(base / "model.safetensors") and info["complete_model"] is True
    explicit = merge("ties", tasks, base=base, progress=False).tensors
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    for k, v in explicit.items():
        torch.testing.assert_close(written[k], v)


def test_list_describes_every_method(capsys):
    from src.merge import list_methods

    assert _cli("--list") == 0
    out = capsys.readouterr().out
    for name in list_methods():
        assert f"| {name} |" in out
    assert "density=0.2" in out and '"global"' in out


# ----- 11. a dense merge onto a base directory is a loadable model -------------------------
def test_dense_merge_onto_a_base_directory_loads_with_transformers(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer_config.json").write_text("{}")
    base_state = load_file(str(tmp_path / "base" / "model.safetensors"))
    tasks = []
    for i in range(2):  # task models hold only the encoder (the finetuned part)
        g = torch.Generator().manual_seed(i)
        state = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base_state.items() if ".encoder." in f".{k}"}
        save_file(state, str(tmp_path / f"t{i}.safetensors"))
        tasks.append(str(tmp_path / f"t{i}.safetensors"))
    out = merge("ties", tasks, base=tmp_path / "base", output=tmp_path / "merged", params={"density": 0.5},
                progress=False).output
    assert {"config.json", "tokenizer_config.json", "README.md", "merge.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    loaded = BertModel.from_pretrained(out)
    merged = merge("ties", tasks, base=tmp_path / "base", params={"density": 0.5}, progress=False).tensors
    state = loaded.state_dict()
    for k, v in base_state.items():  # unmerged tensors come from the base, merged ones from the merge
        want = merged.get(k, v)
        torch.testing.assert_close(state[k], want)
    assert "ties" in (out / "README.md").read_text()


def test_base_given_as_a_hub_id_is_resolved_from_the_local_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "0123abcd"
    _hf_base(snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    tasks = _task_dirs(tmp_path / "ckpt", n=2, base_id="org/tiny")
    by_id = merge("ties", tasks, base="org/tiny", progress=False).tensors
    by_path = merge("ties", tasks, base=snapshot, progress=False).tensors
    for k in by_path:
        torch.testing.assert_close(by_id[k], by_path[k])
    with pytest.raises(MergeInputError, match="not the base model the task models record"):
        merge("ties", tasks, base="org/other", progress=False)
    with pytest.raises(MergeInputError, match="nor a model in the local Hugging Face cache"):
        merge("ties", _task_dirs(tmp_path / "ckpt2", n=2, base_id="org/other"), base="org/other", progress=False)


# ----- found by benchmarks/fault_matrix.py -------------------------------------------------
def test_a_full_disk_while_copying_the_base_files_names_the_output_not_the_input(tmp_path, monkeypatch, capsys):
    import errno

    from src.merge import model_files

    def no_space(src, dst, *args, **kwargs):  # what shutil.copyfile raises on ENOSPC (sendfile)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src), None, str(dst))

    _hf_base(tmp_path / "pretrained")
    tasks = _task_dirs(tmp_path / "ckpt", n=2)
    monkeypatch.setattr(model_files.shutil, "copyfile", no_space)
    monkeypatch.chdir(tmp_path)
    assert _cli("--method", "ties", "--base", "pretrained", "--tasks", json.dumps(tasks), "--output", "out") == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: out/config.json: {os.strerror(errno.ENOSPC)}"  # not the base's config.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "pretrained"]


@pytest.mark.parametrize("earlier", [False, True])
def test_a_writer_committing_right_after_our_race_check_is_not_replaced(tmp_path, monkeypatch, earlier):
    """The other writer renames its output into place between this run's check and its rename:
    this run must fail and leave theirs, not move theirs aside and delete it."""
    import src.safe_output as so

    target = tmp_path / "out"
    if earlier:
        target.mkdir()
        (target / "merge.json").write_text("{}")
    real, calls = so.output_identity, []

    def identity(path):
        result = real(path)
        calls.append(path)
        if len(calls) == 2:  # the commit's check has just passed: the other writer commits now
            if target.exists():
                target.rename(tmp_path / "earlier-moved-by-them")
            target.mkdir()
            (target / "theirs").write_text("2")
        return result

    monkeypatch.setattr(so, "output_identity", identity)
    with pytest.raises(OutputError, match="another process"):
        with atomic_directory(target) as d:
            (d / "mine").write_text("1")
    assert sorted(p.name for p in target.iterdir()) == ["theirs"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_concurrent_writer_of_the_same_output_is_reported_not_removed(tmp_path, capsys):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".out.{alive.pid}.abc.tmp"
        theirs.mkdir()
        (theirs / "model.safetensors").write_text("half")
        with atomic_directory(tmp_path / "out") as d:
            (d / "f").write_text("1")
    finally:
        alive.kill()
        alive.wait()
    assert f"process {alive.pid} is writing" in capsys.readouterr().err
    assert (theirs / "model.safetensors").read_text() == "half"


class _Payload:
    """Unpickling this would create a directory."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("payload", ["reduce", "object"])
def test_a_pickle_payload_is_refused_in_one_line_without_unsafe_advice(tmp_path, capsys, payload):
    base = base_model()
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    save_file(full_task_state(base, 0), str(tmp_path / "t0.safetensors"))
    marker = tmp_path / "PWNED"
    obj = _Payload(str(marker)) if payload == "reduce" else {"w": __import__("collections").OrderedDict, "x": _Payload}
    torch.save({"state_dict": {"layers.0.q_proj.weight": obj}}, tmp_path / "evil.ckpt")
    rc = _cli("--method", "ties", "--base", tmp_path / "base.safetensors", "--tasks",
              json.dumps([str(tmp_path / "t0.safetensors"), str(tmp_path / "evil.ckpt")]), "--output", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists() and not (tmp_path / "out").exists()
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'evil.ckpt'}: "), err
    assert "GLOBAL" in err and "weights_only=False" not in err and "weights_only` set to `False" not in err
    assert "\x1b[" not in err


def test_legacy_and_truncated_torch_checkpoints(tmp_path, capsys):
    base = base_model()
    save_file(base.state_dict(), str(tmp_path / "base.safetensors"))
    states = [full_task_state(base, i) for i in range(2)]
    torch.save({"state_dict": states[0]}, tmp_path / "zip.ckpt")
    torch.save({"state_dict": states[1]}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    tasks = [str(tmp_path / "zip.ckpt"), str(tmp_path / "legacy.ckpt")]  # a legacy file cannot be mmapped
    merged = merge("task_arithmetic", tasks, base=tmp_path / "base.safetensors", params={"lam": 1.0}, progress=False).tensors
    key = "layers.0.q_proj.weight"
    torch.testing.assert_close(merged[key], states[0][key] + states[1][key] - base.state_dict()[key])
    data = (tmp_path / "zip.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    rc = _cli("--method", "ties", "--base", tmp_path / "base.safetensors", "--tasks",
              json.dumps([tasks[0], str(tmp_path / "cut.ckpt")]), "--output", tmp_path / "out")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cut.ckpt: is truncated or corrupt" in err


def test_an_output_created_after_the_check_is_not_replaced(tmp_path):
    from src.safe_output import output_identity

    target = tmp_path / "out"
    accepted = output_identity(target)  # nothing there when checked
    target.mkdir()
    (target / "theirs").write_text("1")
    with pytest.raises(OutputError, match="after it was checked"):
        with atomic_directory(target, expect=accepted) as d:
            (d / "mine").write_text("2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "theirs").is_file()


def test_sigterm_before_writing_exits_like_ctrl_c(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        import src.merge.__main__ as cli
        def slow_merge(*a, **k):
            print("merging", flush=True)
            time.sleep(60)
        cli.merge = slow_merge
        sys.exit(cli.main(["--method", "average", "--tasks", "[a, b]", "--output", {str(tmp_path / 'out')!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "merging"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted: no output was written" in err
