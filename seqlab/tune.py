"""Search: an Optuna study over report parameters. Each trial is one run of the runner, nested
under the study's tracked parent run and pruned on validation accuracy; workers share the study
through its storage (studies) and write the best trial as a params file."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import yaml

from seqlstm import _check_choice, model_options
from seqlab import files, plan, report, runner, schema, studies, tracking

TUNE_KEYS = ("search", "pruner", "prune_after")  # a tune file's keys besides report parameters


NOT_SEARCHED = (
    plan.PLANNED
    + plan.PER_RUN
    + (  # what one study holds fixed: its run, its data, how it runs
        "resume",
        "threads",
        "data_dir",
        "val_fraction",
        "seed",
        "limit_train",
        "image_size",
        "grayscale",
        "channels",
        "dataset_args",
        "overview_per_class",
        "tune_study",
        "tune_storage",
        "devices",
        "num_nodes",
        "strategy",
    )
)


PRUNERS = {  # each given prune_after: the epochs every trial runs before it may be stopped
    "median": lambda after: __import__("optuna").pruners.MedianPruner(
        n_startup_trials=2, n_warmup_steps=after  # steps are epochs, 1 first: none before `after`
    ),
    "hyperband": lambda after: __import__("optuna").pruners.HyperbandPruner(min_resource=after),
}


@dataclass
class TuneSpec:
    """A checked tune file: the report parameters (defaults included), the search space
    (name -> Optuna distribution), which names are model_args keys, the pruner and the epochs
    every trial runs before it may be pruned."""

    params: dict
    given: dict  # the fixed parameters as the file gives them (for the best-parameters file)
    space: dict
    model_keys: set
    pruner: str
    prune_after: int = 1


def _distribution(name, spec):
    """A list is categorical; {low, high[, log][, step]} a float range, an int range when low
    and high are both integers."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"search.{name} = {spec!r}"
    if isinstance(spec, list):
        if not spec or not all(v is None or isinstance(v, (bool, int, float, str)) for v in spec):
            raise schema.ParamError(
                f"{where}: a categorical search is a non-empty list of numbers, strings or booleans"
            )
        return CategoricalDistribution(spec)
    keys = {"low", "high", "log", "step"}
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - keys:
        raise schema.ParamError(
            f"{where}: expected a list of values or "
            f"{{low: .., high: .., log: true|false, step: ..}}"
        )
    low, high = spec["low"], spec["high"]
    if not all(schema._KINDS["float"](v) for v in (low, high)) or not low < high:
        raise schema.ParamError(f"{where}: low and high must be numbers with low < high")
    kind = (
        IntDistribution if all(schema._KINDS["int"](v) for v in (low, high)) else FloatDistribution
    )
    try:
        step = {"step": spec["step"]} if "step" in spec else {}  # Optuna's default otherwise
        return kind(low, high, log=bool(spec.get("log", False)), **step)
    except (ValueError, TypeError) as e:
        raise schema.ParamError(f"{where}: {e}") from None


def apply_trial(spec: TuneSpec, values: dict) -> dict:
    """The report parameters of one trial: the fixed ones updated by `values` (model_args keys
    merged)."""
    p = {**spec.params, "model_args": dict(spec.params["model_args"])}
    for name, value in values.items():
        (p["model_args"] if name in spec.model_keys else p)[name] = value
    return p


def _search_names(search, p, types):
    """Which search names are model_args keys; a name that is neither a searchable report parameter
    nor a model argument fails, listing both."""
    searchable = [k for k in types if k not in NOT_SEARCHED]
    model_args = model_options(p["model"])
    bad = sorted(set(search) - set(searchable) - set(model_args))
    if bad:
        raise schema.ParamError(
            f"search: {bad} not a report parameter or model argument that a study may vary: "
            f"report parameters {searchable}, model arguments of {p['model']!r} {model_args}"
        )
    return {k for k in search if k not in types}


def _check_prune_after(value, epochs, path):
    """prune_after: the epochs every trial runs before the pruner may stop it, from 1 (after
    its first epoch) to the trials' epochs."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= epochs:
        raise schema.ParamError(
            f"{path}: prune_after = {value!r}: expected a whole number of epochs from 1 (a trial "
            f"may be pruned after its first epoch) to epochs = {epochs}"
        )


def read_tune_file(path) -> TuneSpec:
    """A tune file checked as far as it can be without data: fixed parameters as a report's, one
    run, a well-formed search space whose every bound and choice passes plan_report."""
    given = schema.read_params_file(path)
    tune = {key: given.pop(key) for key in TUNE_KEYS if key in given}  # the rest: a report's
    search, pruner = tune.get("search"), tune.get("pruner", "median")
    prune_after = tune.get("prune_after", 1)
    types = schema.types()
    schema.check_params(given, types, where=f"{path}: ")
    if not isinstance(search, dict) or not search:
        raise schema.ParamError(
            f"{path}: `search` must map parameters to ranges or lists, e.g. "
            f"search: {{lr: {{low: 1.0e-4, high: 1.0e-2, log: true}}, hidden: [32, 64]}}"
        )
    _check_choice("pruner", pruner, list(PRUNERS))
    p = {**schema.defaults(), **given}
    _check_prune_after(prune_after, p["epochs"], path)
    runs = plan.plan_report(p, types)
    if len(runs) != 1:
        raise schema.ParamError(
            f"{path}: a study tunes one run, this file plans {len(runs)}: give one dataset, "
            f"model, transform and seq_len, and no variants"
        )
    fixed = {k: v for k, v in runs[0].params.items() if k != "variant"}  # the run's, as parameters
    if fixed["seq_len"] is None:  # a transform whose length the image fixes: seq_len as given
        fixed["seq_len"] = p["seq_len"]
    spec = TuneSpec(
        fixed,
        given,
        {k: _distribution(k, v) for k, v in search.items()},
        _search_names(search, fixed, types),
        pruner,
        prune_after,
    )
    for name, dist in spec.space.items():  # every bound and choice is a valid value
        for value in getattr(dist, "choices", None) or (dist.low, dist.high):
            try:
                plan.plan_report(apply_trial(spec, {name: value}), types)
            except schema.ParamError as e:
                raise schema.ParamError(f"search.{name} = {value!r}: {e}") from None
    return spec


def prepare_tune(spec: TuneSpec):
    """prepare_report for the study's run, and the model built at every model_args bound and
    choice."""
    runs, loaded = report.prepare_report(spec.params, schema.types())
    for name in spec.model_keys:
        dist = spec.space[name]
        for value in getattr(dist, "choices", None) or (dist.low, dist.high):
            plan.check_run_inputs(
                plan.plan_report(apply_trial(spec, {name: value}), schema.types()), loaded
            )
    return loaded[runs[0].data.key]


def _worker_id():
    return f"{socket.gethostname()}:{os.getpid()}"


def _counts(trial):
    """A trial that counts towards --trials: finished, pruned, failed in training, or running.
    A trial failed without a training error is one its worker died in; it is tried again."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) or (
        trial.state == TrialState.FAIL and "failure" in trial.user_attrs
    )


def _fail_dead_trials(study, trials):
    """RUNNING trials of workers on this machine that no longer exist are marked FAIL."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in trials:
        worker = t.user_attrs.get("worker", "")
        if t.state == TrialState.RUNNING and worker.startswith(f"{host}:"):
            try:
                os.kill(int(worker.split(":")[1]), 0)
            except ProcessLookupError:
                study.tell(t.number, state=TrialState.FAIL)


def _suggest(trial, name, dist):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    suggest = trial.suggest_int if isinstance(dist, IntDistribution) else trial.suggest_float
    return suggest(name, dist.low, dist.high, step=dist.step, log=dist.log)


def claim_trial(study, spec: TuneSpec, n_trials, storage):
    """(trial, its report parameters), or None when the study holds n_trials trials that count.
    Under the study lock, so that workers together start exactly n_trials; the sampler is seeded
    by (seed, trial count), so a study is reproducible and workers never draw the same stream."""
    import optuna

    with studies.study_lock(storage, study.study_name):
        trials = study.get_trials(deepcopy=False)
        _fail_dead_trials(study, trials)
        if sum(_counts(t) for t in study.get_trials(deepcopy=False)) >= n_trials:
            return None
        study.sampler = optuna.samplers.TPESampler(seed=spec.params["seed"] * 100_003 + len(trials))
        trial = study.ask()
        trial.set_user_attr("worker", _worker_id())
        return trial, apply_trial(
            spec, {name: _suggest(trial, name, d) for name, d in spec.space.items()}
        )


class PruneOnValAcc(pl.Callback):
    """Reports each epoch's validation accuracy to an Optuna trial and stops the run (Lightning's
    should_stop, after this epoch) when the pruner says so. Written on pytorch_lightning.Callback:
    optuna-integration's callback subclasses the separate `lightning` package."""

    def __init__(self, trial):
        self.trial, self.pruned_at = trial, None

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking or not module.history:
            return
        record = module.history[-1]
        self.trial.report(record["val_acc"], record["epoch"])
        if self.trial.should_prune():
            self.pruned_at, trainer.should_stop = record["epoch"], True


def parent_run(study, storage, tracker):
    """The study's MLflow parent run: created once (under the study lock), its id kept in the
    study."""
    with studies.study_lock(storage, study.study_name):
        run_id = study.user_attrs.get("mlflow_parent_run_id")
        if run_id is None:
            run_id = tracker.create(f"study {study.study_name}", {"optuna.study": study.study_name})
            study.set_user_attr("mlflow_parent_run_id", run_id)
        else:
            tracker.reopen(run_id)
    return run_id


def run_trial(trial, p, data, parent, tracker):
    """One trial: the runner's run of `p`, pruned on validation accuracy, as an MLflow run nested
    under `parent` and tagged with the trial's state. Returns (state, value, pruned epoch or
    None)."""
    from optuna.trial import TrialState

    prune = PruneOnValAcc(trial)
    tags = {
        "mlflow.parentRunId": parent,
        "optuna.study": trial.study.study_name,
        "optuna.trial": str(trial.number),
    }
    result = runner.run_experiment(
        plan.plan_report(p, schema.types())[0], data, callbacks=[prune], tags=tags
    )
    run_id = result.row["mlflow_run_id"]
    trial.set_user_attr("mlflow_run_id", run_id)
    if result.status == "failed":
        trial.set_user_attr("failure", result.error[:500])
        state, value = TrialState.FAIL, None
    else:
        state = TrialState.PRUNED if prune.pruned_at else TrialState.COMPLETE
        value = max(h["val_acc"] for h in result.history)  # selection on validation, never on test
        trial.set_user_attr("test_acc", result.row["test_acc"])
    if run_id:
        tracker.tag(run_id, {"optuna.state": state.name})
        if prune.pruned_at:  # a finished run, not a reusable result of these parameters
            tracker.tag(run_id, {tracking.STATUS: "pruned", "optuna.pruned_epoch": prune.pruned_at})
    return state, value, prune.pruned_at


def progress_line(study, trial, state, value, pruned_at, n_trials):
    """One line per trial: its value or pruned epoch, trials done / pruned / left, best so far."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = sum(t.state.is_finished() and _counts(t) for t in trials)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    what = {
        TrialState.COMPLETE: f"val_acc {value:.4f}" if value is not None else "",
        TrialState.PRUNED: f"pruned at epoch {pruned_at}",
        TrialState.FAIL: f"failed ({trial.user_attrs.get('failure', '')[:80]})",
    }[state]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    shown = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items()
    )
    return (
        f"trial {trial.number}: {what}  ({shown}) | {done}/{n_trials} done, {pruned} pruned, "
        f"{max(0, n_trials - done)} left | best "
        + (f"{best.value:.4f} (trial {best.number})" if best else "-")
    )


def tune_worker(study, spec: TuneSpec, data, n_trials, storage):
    """Claim trials until the study holds n_trials, run each, tell the study, print a line."""
    from optuna.trial import TrialState

    tracker = tracking.Tracker(spec.params["experiment"])
    parent = parent_run(study, storage, tracker)
    while (claimed := claim_trial(study, spec, n_trials, storage)) is not None:
        trial, p = claimed
        try:
            state, value, pruned_at = run_trial(trial, p, data, parent, tracker)
        except BaseException:
            study.tell(
                trial, state=TrialState.FAIL
            )  # an interrupt: the trial is tried again on resume
            raise
        study.tell(
            trial,
            value if state == TrialState.COMPLETE else None,
            state=None if state == TrialState.COMPLETE else state,
        )
        print(progress_line(study, trial, state, value, pruned_at, n_trials), flush=True)
    if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tracker.end(parent)


def write_best(study, spec: TuneSpec, path, storage):
    """params/best_<study>.yaml: the tune file's fixed parameters and the best trial's, a params
    file that `report` and papermill's -f take as they are; it names the study for the Tuning
    section."""
    best = study.best_trial
    p = {k: v for k, v in spec.given.items() if k != "experiment"}
    args = dict(p.get("model_args") or {})
    for name, value in best.params.items():
        (args if name in spec.model_keys else p)[name] = value
    p.update({"model_args": args} if args else {}, tune_study=study.study_name)
    note = ""
    if storage != studies.storage_url():
        p["tune_storage"] = files.without_password(storage)
        if p["tune_storage"] != storage:
            note = (
                "# The storage's password is not written here: the driver reads it from "
                "$PGPASSWORD or ~/.pgpass.\n"
            )
    return files.write_text(
        path,
        f"# Best trial {best.number} of the Optuna study {study.study_name} (validation accuracy "
        f"{best.value:.4f}), written by `python seqlstm.py tune`.\n# Report it with: "
        f".venv/bin/python seqlstm.py report {path}\n{note}" + yaml.safe_dump(p, sort_keys=False),
    )


def spawn_workers(path, n_trials, workers, storage, name, best):
    """`workers` tune processes on this machine, one study in one storage; exits with the worst."""
    cmd = [
        sys.executable,
        "-m",
        "seqlab",
        "tune",
        str(path),
        "--trials",
        str(n_trials),
        "--storage",
        storage,
        "--study",
        name,
        "--best",
        str(best),
    ]
    procs = [subprocess.Popen(cmd, cwd=files.ROOT) for _ in range(workers)]
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)


def tune(path, n_trials=20, workers=1, storage="", study_name=None, best=None):
    """Search the tune file's space: create (or continue) the study, run trials until it holds
    n_trials, write the best parameters. Every input is checked before the first trial."""
    import optuna

    if n_trials < 1 or workers < 1:
        raise schema.ParamError(
            f"--trials and --workers must be >= 1, got --trials {n_trials} --workers {workers}"
        )
    spec = read_tune_file(path)
    name = study_name or Path(path).stem
    spec.params["experiment"] = name
    storage = studies.storage_url(storage, workers)
    best = best or files.ROOT / "params" / f"best_{name}.yaml"
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial of our own instead
    study = optuna.create_study(
        study_name=name,
        storage=studies.open_storage(storage),
        direction="maximize",
        pruner=PRUNERS[spec.pruner](spec.prune_after),
        load_if_exists=True,
    )
    print(
        f"study {name} in {files.masked(storage)}: {len(study.trials)} trial(s) so far, "
        f"{n_trials} wanted, "
        f"{workers} worker(s); search {sorted(spec.space)}",
        flush=True,
    )
    if workers > 1:
        files.check_outputs(), tracking.check_tracking()
        code = spawn_workers(path, n_trials, workers, storage, name, best)
    else:
        tune_worker(study, spec, prepare_tune(spec), n_trials, storage)
        code = 0
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        print(f"best parameters: {write_best(study, spec, best, storage)}", flush=True)
    return code
