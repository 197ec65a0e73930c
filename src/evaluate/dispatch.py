"""Dispatch an evaluation run as independent jobs (SLURM or local processes), then collect.

    python -m src.evaluate.dispatch --config configs/evaluate/demo.yaml                   # local processes
    python -m src.evaluate.dispatch --config configs/evaluate/A_knots_vitb32_lora.yaml --executor slurm \
        --slurm.partition gpu --slurm.gpus_per_node 1 --slurm.timeout_min 240 [--jobs 8]
    python -m src.evaluate.dispatch --config ... --collect_only true      # merge the parts again, re-render
    python -m src.evaluate.dispatch --config ... --dry_run true           # print the jobs, run nothing

Every option of ``python -m src.evaluate`` (``--rows``, ``--protocol``, ``--only``...) works here too.

**Engine: submitit** (``AutoExecutor``: ``slurm``, ``local``, ``debug``). Chosen over Ray because
the work is a handful of coarse, independent, hours-long batch jobs on SLURM clusters, where
submitit submits real ``sbatch`` jobs (each with its own GPU, time limit, log files, requeue on
preemption/timeout) and needs nothing running on the cluster; Ray would need a Ray cluster started
inside a SLURM allocation (head node, workers, object store) for no gain: the jobs exchange no
data in memory, only rows files. submitit's ``LocalExecutor`` runs the identical jobs as local
processes (``--executor local``, the default) and ``DebugExecutor`` in this process (``debug``).
It is small and pure Python (its dependencies, cloudpickle and typing_extensions, are already here).

**Granularity.** One job per method (a method's *stages* are sequential: stage k+1 searches around
what stage k selected, and the selected point's test and joint rows depend on the whole search;
its grid points also share one :class:`src.merge.Sweep`, i.e. SVDs, centering and statistics are
computed once per method). That is always correct. Finer jobs, one per grid point, would be
correct only *within* a stage (its points are independent given the values fixed so far) and
need a barrier after every stage, and each would pay the process start, model load and the
Sweep's shared work again; not done here. Exceptions:

* methods that ``reuse`` another method's selection (MaTS' ``lam_init`` from Task Arithmetic,
  the compositional protocol's DARE at TA's lambda) run in the same job as that method;
* labels that select each other under ``only`` (a label equal to another entry's method name)
  share a job, so each job selects exactly its methods.

Waves: (1) ``references``: the finetuned and zero-shot rows every selection score and every
``finetuned`` column reads, and the data statistics of every data-dependent method (computed once
per task model here, so that concurrent jobs never write one ``statistics/<tag>/`` directory at
once); (2) one job per method group (each writes its methods' grid, selected and joint rows), and
``ensemble`` (the Ensemble rows and its joint rows), all in parallel; (3) collect.

**Rows.** Each job runs the existing :class:`EvaluationRun` (method jobs through ``run()``
restricted with ``only=[its labels]``) and appends only to its OWN file
``<rows>.parts/<job>.jsonl``; what it may skip is read from the run's rows file and the
references part (read-only). ``collect`` then appends to the run's rows file every part row whose
key (``rows.row_key``) it does not hold yet (written atomically: a second collect changes nothing),
merges the jobs' ``timing`` into ``timing.json`` and renders ``report.md`` / the plots with
:func:`src.evaluate.run.write_reports`: the same rows and report as ``python -m src.evaluate``
(``tests/evaluate/test_dispatch.py``). Learned coefficients (AdaMerging) go where the in-process
run puts them (``coefficients/`` next to the rows), so the rows' params are identical too.

**Failures.** A failed job is reported by name with the end of its error and its log file; the
other jobs' rows are still collected, and the command exits 1. Running the same command again
re-runs every job, and each skips the rows it already has (finished jobs load nothing).
On SLURM a job that times out or is preempted is requeued by submitit and resumes from its rows.

**Where the dispatcher runs.** It waits for the jobs (polling ``sacct`` through submitit), so on
a cluster run it where it may live for the whole sweep: in ``tmux`` on the login node, or as a
small CPU-only job itself (``scripts/slurm/evaluate_dispatch.sh``). Jobs run in the working
directory of the dispatcher (relative paths in the config mean the same thing) with the same
Python (``sys.executable``); ``--slurm.setup`` adds shell lines (``module load``, activating an
environment) before each job.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .rows import RowStore, read_rows, row_key

EXECUTORS = ("local", "slurm", "debug")
#: local jobs may run for this long (submitit's LocalExecutor would kill them after 2 minutes)
LOCAL_TIMEOUT_MIN = 7 * 24 * 60


@dataclass
class SlurmOptions:
    """Resources of every SLURM job (``--slurm.<name>``); one evaluation runs on one device.

    Args:
        partition: ``--partition``.
        gpus_per_node: GPUs per job (an evaluation uses one; 0 for a CPU partition).
        cpus_per_task: CPU cores per job (data loading, merges on the CPU).
        mem_gb: host memory per job (default: the partition's).
        timeout_min: time limit per job; a job that reaches it is requeued and resumes from its rows.
        account, qos, constraint: ``--account``, ``--qos``, ``--constraint``.
        setup: shell lines run before each job (``module load cuda``, ``source .venv/bin/activate``).
        additional: any other sbatch option, e.g. ``{exclude: node12}``.
    """

    partition: Optional[str] = None
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: Optional[float] = None
    timeout_min: int = 240
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    setup: list[str] = field(default_factory=list)
    additional: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobSpec:
    """One job: ``kind`` ``references`` | ``methods`` | ``ensemble``; ``only``: the labels it runs."""

    name: str
    kind: str
    only: list[str] = field(default_factory=list)
    part: str = ""
    timing: str = ""


@dataclass
class DispatchResult:
    jobs: list[str]
    failed: dict[str, str]  # job name -> what went wrong (and where its log is)
    rows_added: int
    rows_total: int
    reports: list[Path]


# ----- paths ------------------------------------------------------------------------------
def rows_path_of(config) -> Path:
    """The run's rows file (as :class:`EvaluationRun` resolves it)."""
    return Path(str(config.rows).replace("{experiment}", config.experiment))


def parts_dir_of(config) -> Path:
    rows = rows_path_of(config)
    return rows.with_name(rows.name + ".parts")


# ----- planning -----------------------------------------------------------------------------
def _label(spec) -> str:
    return spec.label or spec.method


def _selects(spec, names) -> bool:
    """``EvaluationRun.run``'s rule: ``only`` names a method by its name or its label."""
    return spec.method in names or _label(spec) in names


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9+_-]+", "_", text).strip("_") or "method"


def _reuse_sources(config, spec) -> list[str]:
    """The methods whose selection ``spec`` reuses (``EvaluationRun.method``'s lookup)."""
    from .protocols import restrict, search_for
    from .run import LEARNED

    if spec.method == "merged" or spec.method in LEARNED:
        return []
    search = restrict(search_for(spec.method, config.protocol,
                                 {"fixed": spec.fixed, "stages": spec.stages, "reuse": spec.reuse}), config.grid)
    return [str(source).partition(".")[0] for source in search["reuse"].values()]


def plan(config) -> list[list[JobSpec]]:
    """The jobs of ``config`` in waves (a wave starts when the previous one has finished)."""
    from .run import _as_method_spec

    specs = [_as_method_spec(m) for m in config.methods]
    planned = [s for s in specs if not config.only or _selects(s, config.only)]
    # union-find over the planned methods: reuse edges and labels that select each other
    parent = list(range(len(planned)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, spec in enumerate(planned):
        linked = [j for j, other in enumerate(planned) if j != i and _selects(other, {_label(spec)})]
        for source in _reuse_sources(config, spec):
            linked += [j for j, other in enumerate(planned) if source in (other.method, _label(other))]
        for j in linked:
            parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(planned)):
        groups.setdefault(find(i), []).append(i)

    parts = parts_dir_of(config)
    used: set[str] = set()

    def job(name: str, kind: str, only=()) -> JobSpec:
        base, k = name, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        return JobSpec(name, kind, list(only), str(parts / f"{name}.jsonl"), str(parts / f"{name}.timing.json"))

    methods = []
    for members in sorted(groups.values()):
        only = [_label(planned[i]) for i in members]
        chosen = [s for s in specs if _selects(s, only)]
        outside = [_label(s) for s in chosen if not any(s is planned[i] for i in members)]
        if outside:
            raise ValueError(f"method labels {only} also select {outside} (a label equal to another entry's "
                             "method name); give the entries distinct labels")
        methods.append(job(_slug(only[0]), "methods", only))
    waves = [[job("references", "references")]]
    second = methods + ([job("ensemble", "ensemble")] if config.ensemble and len(config.tasks) > 1 else [])
    if second:
        waves.append(second)
    return waves


def method_order(config) -> dict[str, int]:
    """Label -> position in which an in-process run writes the methods' rows: the config's order, a
    reused method just before the first method that reuses it (``EvaluationRun.method`` runs it
    there). ``collect`` appends rows in this order, so tables list the methods as in-process runs do."""
    from .run import _as_method_spec

    specs = [_as_method_spec(m) for m in config.methods]
    order: dict[str, int] = {}

    def visit(spec, seen=()) -> None:
        for source in _reuse_sources(config, spec):
            other = next((m for m in specs if source in (m.method, _label(m))), None)
            if other is not None and _label(other) not in order and other not in seen:
                visit(other, (*seen, spec))
        order.setdefault(_label(spec), len(order))

    for spec in specs:
        if not config.only or _selects(spec, config.only):
            visit(spec)
    return order


def statistics_needed(config, specs) -> dict[tuple[str, int, int], set[str]]:
    """``{(split, n, seed): kinds}`` every data-dependent method among ``specs`` may read, over every
    combination of its stages' points (a superset of what its search visits)."""
    from ..merge import get_method
    from ..merge.sweep import expand_grid
    from .protocols import restrict, search_for
    from .run import LEARNED

    needed: dict[tuple[str, int, int], set[str]] = {}
    for spec in specs:
        if spec.method == "merged" or spec.method in LEARNED:
            continue
        method = get_method(spec.method)
        search = restrict(search_for(spec.method, config.protocol,
                                     {"fixed": spec.fixed, "stages": spec.stages, "reuse": spec.reuse}), config.grid)
        stats = {**config.statistics, **(spec.statistics or {})}
        for combo in itertools.product(*[expand_grid(stage) for stage in search["stages"]] or [[{}]]):
            point = dict(search["fixed"])
            for p in combo:
                point.update(p)
            merge_point = {k: v for k, v in point.items() if k != "n_examples" and k not in search["reuse"]}
            try:
                kinds = method.required_statistics(method.make_params(**merge_point))
            except (TypeError, ValueError):  # a bad grid: the method's own job reports it
                continue
            if kinds:
                where = (str(stats["split"]), int(point.get("n_examples", stats["n"])), int(stats.get("seed", 0)))
                needed.setdefault(where, set()).update(kinds)
    return needed


# ----- inside a job ---------------------------------------------------------------------------
class _SeededStore(RowStore):
    """A job's rows: appended to its own part file; ``has`` / ``get`` also see ``seed`` (the run's
    rows file and the references part, read when the job starts, never written)."""

    def __init__(self, path, seed: list[dict[str, Any]]):
        super().__init__(path)
        for row in seed:
            self._keys.setdefault(row_key(row), row)


def _job_run(config, job: JobSpec, seeds: list[str]):
    """An :class:`EvaluationRun` writing to ``job.part``, everything else where the run puts it."""
    from ..safe_output import replace_own_file
    from .run import EvaluationRun

    class PartRun(EvaluationRun):
        def write_timing(self) -> None:  # collected into timing.json by ``collect``
            replace_own_file(Path(job.timing), json.dumps({"job": job.name, "timing": self.timing}) + "\n",
                         '{"job": ')

    run = PartRun(config)  # its rows_path stays the run's: coefficients/ land where in-process runs put them
    seed = list(run.store)  # the run's rows file
    for path in seeds:
        seed += read_rows(path)
    run.store = _SeededStore(job.part, seed)
    return run


class EvaluationJob:
    """The callable each submitted job runs (picklable; requeued by submitit on timeout/preemption,
    when it resumes from its rows)."""

    def __init__(self, config, job: JobSpec, seeds: list[str], threads: Optional[int] = None):
        self.config, self.job, self.seeds, self.threads = config, job, list(seeds), threads

    def __call__(self) -> dict[str, Any]:
        import torch

        from ..finetune.quiet import quiet_known_noise

        quiet_known_noise()
        if self.threads:
            torch.set_num_threads(self.threads)
        elif not os.environ.get("OMP_NUM_THREADS"):
            from ..merge.memory import use_free_cores

            use_free_cores()
        job = self.job
        Path(job.part).parent.mkdir(parents=True, exist_ok=True)
        config = dataclasses.replace(self.config, only=list(job.only) or None, report=False,
                                     ensemble=job.kind == "ensemble")
        run = _job_run(config, job, self.seeds)
        start = time.perf_counter()
        if job.kind == "references":
            run.references()
            specs = [s for s in run.methods if not self.config.only or _selects(s, self.config.only)]
            for (split, n, seed), kinds in sorted(statistics_needed(self.config, specs).items()):
                run.ensure_statistics(sorted(kinds), split, n, seed)
        elif job.kind == "methods":
            run.run()
        elif job.kind == "ensemble":
            run.references()  # cached: read from the seed
            run.ensemble()
        else:
            raise ValueError(f"unknown job kind {job.kind!r}")
        return {"job": job.name, "rows": len(run.store), "wall_s": round(time.perf_counter() - start, 1)}

    def checkpoint(self, *args, **kwargs):
        """submitit's requeue hook (SLURM timeout / preemption): run the same job again."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


# ----- collect ----------------------------------------------------------------------------------
def collect(config, jobs: Optional[list[JobSpec]] = None, report: Optional[bool] = None) -> tuple[int, int, list[Path]]:
    """Append to the run's rows file every row of the jobs' parts whose key it lacks (atomically; in
    the order an in-process run writes them), merge their timing into ``timing.json`` and render the
    report. Idempotent. Returns (rows added, rows in the file, files written)."""
    from .run import EvaluationRun, write_reports

    jobs = [j for wave in plan(config) for j in wave] if jobs is None else jobs
    path = rows_path_of(config)
    store = RowStore(path)  # also mends a torn last line
    keys = {row_key(r) for r in store}
    new = []
    for job in jobs:
        for row in read_rows(job.part):
            key = row_key(row)
            if key not in keys:
                keys.add(key)
                new.append(row)
    order = method_order(config)

    def position(row) -> int:  # references, the methods (in-process order), the Ensemble
        if row.get("method") in ("finetuned", "zeroshot"):
            return -1
        return len(order) + 1 if row.get("method") == "ensemble" else order.get(row.get("label"), len(order))

    new.sort(key=position)  # stable: each job's own order is kept
    if new:
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_bytes() if path.is_file() else b""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(old + "".join(json.dumps(r, default=str) + "\n" for r in new).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    run = EvaluationRun(config)
    timing = []
    for job in jobs:
        if Path(job.timing).is_file():
            timing += json.loads(Path(job.timing).read_text()).get("timing", [])
    if timing:
        run.timing = timing
        run.write_timing()
    written = write_reports(run) if (config.report if report is None else report) else []
    return len(new), len(run.store), written


# ----- submitting -------------------------------------------------------------------------------
def make_executor(kind: str, folder: Path, slurm: SlurmOptions, name: str):
    import submitit

    if kind not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {kind!r}")
    if kind == "local":
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
        return executor
    if kind == "debug":
        return submitit.DebugExecutor(folder=str(folder))
    executor = submitit.AutoExecutor(folder=str(folder), cluster=kind)
    if kind == "slurm":
        params: dict[str, Any] = {"timeout_min": slurm.timeout_min, "nodes": 1, "tasks_per_node": 1,
                                  "gpus_per_node": slurm.gpus_per_node, "cpus_per_task": slurm.cpus_per_task,
                                  "name": name}
        if slurm.mem_gb is not None:
            params["mem_gb"] = slurm.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(slurm, key):
                params[f"slurm_{key}"] = getattr(slurm, key)
        if slurm.setup:
            params["slurm_setup"] = list(slurm.setup)
        if slurm.additional:
            params["slurm_additional_parameters"] = dict(slurm.additional)
        executor.update_parameters(**params)
    return executor


def _failure(job, exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    error = next((line.strip() for line in reversed(lines) if re.match(r"^\w[\w.]*(Error|Exception)\b", line.strip())),
                 lines[-1].strip() if lines else type(exc).__name__)
    log = getattr(getattr(job, "paths", None), "stderr", None)
    return error + (f" (log: {log})" if log is not None and Path(log).exists() else "")


def _run_wave(executor, kind: str, wave: list[JobSpec], make: Callable[[JobSpec, int], Any], limit: Optional[int],
              say: Callable[[str], None], gpus: int) -> dict[str, str]:
    """Submit ``wave`` (at most ``limit`` at once), wait for all; returns ``{failed job: why}``."""
    failed: dict[str, str] = {}
    limit = max(1, int(limit)) if limit else len(wave)
    todo = list(enumerate(wave))
    running: list[tuple[JobSpec, Any]] = []

    def finish(spec: JobSpec, job) -> None:
        exc = job.exception()  # (the DebugExecutor runs the job here; its result() would open pdb on failure)
        if exc is None:
            out = job.result()
            say(f"job {spec.name}: done ({out.get('rows', '?')} rows written, {out.get('wall_s', '?')} s)")
        else:
            failed[spec.name] = _failure(job, exc)
            say(f"job {spec.name}: FAILED: {failed[spec.name]}")

    def clean():  # sbatch from inside a SLURM job (the dispatcher's own) must not inherit its SLURM_* settings
        import submitit

        return submitit.helpers.clean_env() if kind == "slurm" else contextlib.nullcontext()

    if kind == "slurm" and len(todo) > 1:  # one job array; SLURM runs at most `limit` of it at once
        executor.update_parameters(slurm_array_parallelism=limit)
        with clean(), executor.batch():
            submitted = [(spec, executor.submit(make(spec, i))) for i, spec in todo]
        for spec, job in submitted:
            say(f"job {spec.name}: submitted as {job.job_id}")
        running, todo = submitted, []
    while todo or running:
        while todo and len(running) < limit:
            i, spec = todo.pop(0)
            if kind == "local" and gpus:
                executor.update_parameters(visible_gpus=[i % gpus], gpus_per_node=1)  # one device per job
            with clean():
                job = executor.submit(make(spec, i))
            say(f"job {spec.name}: started" + (f" ({job.job_id})" if kind != "debug" else ""))
            running.append((spec, job))
            if kind == "debug":  # runs in this process, one at a time
                finish(*running.pop())
        still = []
        for spec, job in running:
            if job.done():
                finish(spec, job)
            else:
                still.append((spec, job))
        running = still
        if running:
            time.sleep(0.5 if kind != "slurm" else 15)
    return failed


def dispatch(config, executor: str = "local", slurm: Optional[SlurmOptions] = None, jobs: Optional[int] = None,
             say: Callable[[str], None] = print) -> DispatchResult:
    """Run ``config`` as jobs through submitit (see the module docstring), then :func:`collect`."""
    import torch

    from .run import EvaluationRun

    slurm = slurm or SlurmOptions()
    if jobs is None and executor == "local":
        jobs = 1
    EvaluationRun(config)  # the config's own checks, before anything is submitted
    waves = plan(config)
    RowStore(rows_path_of(config))  # mend a torn last line once, before jobs read the file
    parts = parts_dir_of(config)
    parts.mkdir(parents=True, exist_ok=True)
    ex = make_executor(executor, parts / "logs", slurm, f"eval-{_slug(config.experiment)}")
    gpus = torch.cuda.device_count() if executor == "local" and config.accelerator in ("gpu", "cuda", "auto") else 0
    threads = None
    if executor == "local" and not gpus and not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // max(1, min(jobs or 1, max(len(w) for w in waves))))
    references = waves[0][0]
    failed: dict[str, str] = {}
    names = [j.name for wave in waves for j in wave]
    say(f"dispatch: {len(names)} jobs ({', '.join(names)}) through submitit's {executor} executor; "
        f"parts in {parts}")
    for w, wave in enumerate(waves):
        seeds = [] if w == 0 else [references.part]
        failed.update(_run_wave(ex, executor, wave, lambda spec, i: EvaluationJob(config, spec, seeds, threads),
                                jobs if executor != "debug" else 1, say, gpus))
        if failed and w == 0:
            skipped = [j.name for later in waves[1:] for j in later]
            if skipped:
                say(f"dispatch: the references failed; not started: {', '.join(skipped)}")
            break
    added, total, written = collect(config, [j for wave in waves for j in wave])
    say(f"collect: {added} new rows -> {rows_path_of(config)} ({total} rows)")
    return DispatchResult(names, failed, added, total, written)


# ----- command line -----------------------------------------------------------------------------
def build_parser():
    from jsonargparse import ArgumentParser

    from .run import EvalConfig

    parser = ArgumentParser(prog="python -m src.evaluate.dispatch", description=__doc__.splitlines()[0],
                            default_config_files=[])
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(EvalConfig, as_group=False)
    parser.add_argument("--executor", type=str, default="local", choices=list(EXECUTORS),
                        help="slurm: sbatch jobs; local: local processes (submitit LocalExecutor); "
                             "debug: in this process, one after another")
    parser.add_argument("--jobs", type=Optional[int], default=None,
                        help="at most this many jobs at once (default: local 1, slurm all)")
    parser.add_class_arguments(SlurmOptions, "slurm")
    parser.add_argument("--collect_only", type=bool, default=False, help="only merge the parts and render the report")
    parser.add_argument("--dry_run", type=bool, default=False, help="print the jobs and exit")
    parser.add_argument("--print_report", type=bool, default=False, help="print report.md when done")
    return parser


def main(argv=None) -> int:
    from ..finetune.quiet import quiet_known_noise
    from ..merge.errors import MergeInputError
    from ..merged_output import MergedOutputError
    from ..task_checkpoint import TaskCheckpointError
    from .models import EvaluationError
    from .run import EvalConfig

    quiet_known_noise()
    parser = build_parser()
    cfg = parser.parse_args(argv)
    cfg = (parser.instantiate if hasattr(parser, "instantiate") else parser.instantiate_classes)(cfg)
    config = EvalConfig(**{k: v for k, v in vars(cfg).items() if k in EvalConfig.__dataclass_fields__})
    slurm = cfg.slurm if isinstance(cfg.slurm, SlurmOptions) else SlurmOptions(**vars(cfg.slurm))
    try:
        if cfg.dry_run:
            for w, wave in enumerate(plan(config)):
                for job in wave:
                    print(f"wave {w + 1}: {job.name} ({job.kind}{': ' + ', '.join(job.only) if job.only else ''})"
                          f" -> {job.part}")
            return 0
        if cfg.collect_only:
            added, total, written = collect(config)
            print(f"collect: {added} new rows -> {rows_path_of(config)} ({total} rows)")
            result = DispatchResult([], {}, added, total, written)
        else:
            jobs = cfg.jobs if cfg.jobs is not None else (1 if cfg.executor == "local" else None)
            result = dispatch(config, cfg.executor, slurm, jobs)
    except (EvaluationError, TaskCheckpointError, MergedOutputError, MergeInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in result.reports:
        print(f"wrote {path}")
    if cfg.print_report and result.reports:
        print("\n" + result.reports[0].read_text())
    if result.failed:
        for name, why in result.failed.items():
            print(f"failed job: {name}: {why}", file=sys.stderr)
        print(f"{len(result.failed)} of {len(result.jobs)} jobs failed ({', '.join(result.failed)}); their finished "
              "rows are kept: run the same command again to continue", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
