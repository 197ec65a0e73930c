"""``python -m src.permute`` end to end on two tiny digits MLPs trained from different
initializations: outputs, aligned task models accepted by the merge engine (and unaligned ones
refused with a pointer to alignment), the alpha search, re-run skipping, and the evaluation stage
scoring the merged networks (per task and joint)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from src.finetune.data.digits import DigitsSubsetDataModule
from src.permute.__main__ import main as permute_main
from src.permute.run import METHODS, PermuteConfig, run_permutation
from src.task_checkpoint import read_task_info

from tests.finetune.test_mlp_digits import export_trained


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("perm")
    dirs = []
    for k in (0, 1):
        dm = DigitsSubsetDataModule(subset=k, batch_size=32)
        _, out = export_trained(dm, root / "tasks", init_seed=k, steps=30)
        dirs.append(out)
    return root, dirs


@pytest.fixture(scope="module")
def merged(pair):
    root, dirs = pair
    config = PermuteConfig(tasks=[str(d) for d in dirs], output=str(root / "merged"), n_examples=64,
                           search_examples=64, reset_examples=32, alpha_grid=[0.2, 0.8], max_iter=4)
    return run_permutation(config, progress=False), config


def test_every_method_writes_a_merged_network(pair, merged):
    root, dirs = pair
    paths, _ = merged
    assert [p.name for p in paths] == list(METHODS)
    states = [load_file(str(d / "model.safetensors")) for d in dirs]
    for path in paths:
        info = json.loads((path / "merge.json").read_text())
        assert info["contents"] == "weights" and info["complete_model"]
        assert [t["task"] for t in info["tasks"]] == ["digits-0of2", "digits-1of2"]
        state = load_file(str(path / "model.safetensors"))
        assert set(state) == set(states[0]) and all(torch.isfinite(v).all() for v in state.values())
    average = load_file(str(root / "merged" / "average" / "model.safetensors"))
    for k in average:
        torch.testing.assert_close(average[k], (states[0][k] + states[1][k]) / 2)
    search = json.loads((root / "merged" / "mudsc_zip" / "merge.json").read_text())["permutation"]["alpha_search"]
    assert set(search) == {"0.2", "0.8"}
    chosen = json.loads((root / "merged" / "mudsc_zip" / "merge.json").read_text())["params"]["alpha"]
    assert search[str(chosen)] == max(search.values())
    assert (root / "merged" / "statistics").is_dir()


def test_aligned_task_models_average_to_the_alignment_merge(pair, merged):
    from src.merge.__main__ import main as merge_main

    root, dirs = pair
    aligned = root / "merged" / "act_align" / "aligned"
    infos = [read_task_info(aligned / t) for t in ("digits-0of2", "digits-1of2")]
    assert all(i.aligned_to["frame"] == read_task_info(dirs[0]).base_model for i in infos)
    assert infos[1].aligned_to["source"] == str(dirs[1]) and infos[1].aligned_to["method"] == "act_align"
    out = root / "engine_average"
    rc = merge_main(["--method", "average", "--tasks", json.dumps([str(aligned / "digits-0of2"), str(aligned / "digits-1of2")]),
                     "--output", str(out)])
    assert rc == 0
    got = load_file(str(out / "model.safetensors"))
    want = load_file(str(root / "merged" / "act_align" / "model.safetensors"))  # MLPs: no BatchNorm to reset
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_engine_refuses_unaligned_models_from_different_inits(pair, capsys):
    from src.merge.__main__ import main as merge_main

    root, dirs = pair
    rc = merge_main(["--method", "average", "--tasks", json.dumps([str(dirs[0]), str(dirs[1])]), "--output", str(root / "refused")])
    err = capsys.readouterr().err
    assert rc != 0 and "different initializations" in err and "src.permute" in err
    assert not (root / "refused").exists()


def test_a_rerun_skips_finished_methods_and_refuses_a_foreign_directory(pair, merged, tmp_path):
    root, dirs = pair
    paths, config = merged
    stamp = (paths[0] / "model.safetensors").stat().st_mtime_ns
    run_permutation(PermuteConfig(**{**config.__dict__, "methods": ["average"]}), progress=False)
    assert (paths[0] / "model.safetensors").stat().st_mtime_ns == stamp
    foreign = tmp_path / "mine"
    (foreign / "zipit").mkdir(parents=True)
    (foreign / "zipit" / "notes.txt").write_text("keep me")
    rc = permute_main(["--tasks", json.dumps([str(d) for d in dirs]), "--output", str(foreign),
                       "--methods", '["zipit"]', "--n_examples", "16", "--reset_examples", "16"])
    assert rc == 2 and (foreign / "zipit" / "notes.txt").read_text() == "keep me"


def test_evaluation_scores_the_merged_networks(pair, merged, tmp_path):
    from src.evaluate import EvalConfig, EvaluationRun, JointSpec
    from src.evaluate.run import write_reports

    root, dirs = pair
    methods = [{"method": "merged", "label": m, "path": str(root / "merged" / m)} for m in ("average", "zipit")]
    config = EvalConfig(experiment="perm", tasks=[str(d) for d in dirs], rows=str(tmp_path / "rows.jsonl"),
                        protocol=None, methods=methods, ensemble=True, zeroshot=False,
                        joint=JointSpec(enabled=True, ks=[1]), accelerator="cpu", progress=False)
    run = EvaluationRun(config)
    run.run()
    rows = list(run.store)
    # recomputed here: each task model's head on the zipped network, and one head over both halves' labels
    from src.finetune.load import load_task_model

    state = load_file(str(root / "merged" / "zipit" / "model.safetensors"))
    modules = [load_task_model(d) for d in dirs]
    correct, total = 0, 0
    heads = torch.cat([m.head_state_dict()["weight"] for m in modules])  # the halves' labels, in task order
    offset = 0
    for module, d in zip(modules, dirs):
        info = read_task_info(d)
        module.model.load_state_dict(state)
        dm = DigitsSubsetDataModule(subset=int(info.task.split("-")[1][0]), batch_size=32)
        dm.setup("test")
        hits, n = 0, 0
        with torch.no_grad():
            for batch in dm.test_dataloader():
                hits += int((module.logits(batch).argmax(-1) == batch["labels"]).sum())
                features = torch.nn.functional.normalize(module.model(batch["pixel_values"]), dim=-1)
                joint_pred = (features @ torch.nn.functional.normalize(heads, dim=-1).T).argmax(-1)
                correct += int((joint_pred == batch["labels"] + offset).sum())
                n += len(batch["labels"])
        row = next(r for r in rows if r["label"] == "zipit" and r["task"] == info.task and r["split"] == "test"
                   and r["metric"] == "acc")
        assert row["value"] == pytest.approx(hits / n)
        offset += len(info.label_names)
        total += n
    joint = [r for r in rows if r["task"] == "joint" and r["dataset"] == "union" and r["label"] == "zipit"]
    assert len(joint) == 1 and joint[0]["value"] == pytest.approx(correct / total)
    report = write_reports(run)[0].read_text()
    assert "MuDSC Table 1 layout" in report and "| zipit |" in report
