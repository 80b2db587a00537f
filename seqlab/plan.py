"""A report's runs, planned from its parameters before anything trains: each a Run carrying its
checked parameters and, read from them once, the typed objects the later steps use (DataSpec,
SequenceSpec, ModelSpec, TrainSpec, DistillSpec, ComputeSpec: one per schema group)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, fields
from functools import cached_property

from seqlstm import (
    DATASETS,
    INITS,
    MODELS,
    SEQUENCES,
    build_teacher,
    create_model,
    list_datasets,
    list_models,
    load_dataset,
    make_sequence,
    sequence_shape,
)
from seqlab import lightning, schema


@dataclass(frozen=True)
class DataSpec:
    """Which images, and how they are loaded and split (0 and empty mean "the default")."""

    dataset: str
    data_dir: str
    dataset_args: dict
    image_size: int
    grayscale: bool
    channels: int
    val_fraction: float
    limit_train: int
    split_seed: int  # of the train/validation split, whatever the training seed

    def load_args(self) -> dict:
        """load_dataset's keyword arguments."""
        return dict(
            data_dir=self.data_dir or None,
            val_fraction=self.val_fraction,
            seed=self.split_seed,
            limit_train=self.limit_train or None,
            image_size=self.image_size or None,
            grayscale=bool(self.grayscale),
            channels=self.channels or None,
            dataset_args=self.dataset_args or None,
        )

    @property
    def key(self):
        """Runs with the same key read the same loaded data."""
        return self.dataset, json.dumps(self.load_args(), sort_keys=True, default=str)

    def load(self):
        return load_dataset(self.dataset, **self.load_args())


@dataclass(frozen=True)
class SequenceSpec:
    transform: str
    seq_len: object  # int, or None for the transforms whose length the image fixes
    transform_args: dict  # as given: the arguments, or per transform name

    @property
    def args(self) -> dict:
        """The transform's arguments: `transform_args`, or its entry for this transform when it
        is keyed by transform names."""
        targs = self.transform_args or {}
        if targs and set(targs) <= set(SEQUENCES):
            targs = targs.get(self.transform, {})
        return dict(targs)

    def make(self):
        return make_sequence(self.transform, seq_len=self.seq_len, **self.args)


@dataclass(frozen=True)
class ModelSpec:
    model: str
    model_args: dict
    init: str

    def build(self, in_features: int, num_classes: int):
        model = create_model(
            self.model, in_features=in_features, num_classes=num_classes, **self.model_args
        )
        INITS[self.init](model)
        return model


@dataclass(frozen=True)
class TrainSpec:
    epochs: int
    batch_size: int
    eval_batch_size: int
    lr: float
    weight_decay: float
    grad_clip: float
    label_smoothing: float
    optimizer: str
    schedule: str
    warmup_epochs: int
    precision: object
    augment: str
    seed: int  # of initialisation, batch order, augmentation and dropout


@dataclass(frozen=True)
class DistillSpec:
    teacher: str
    teacher_args: dict
    teacher_epochs: int
    distill_alpha: float
    distill_T: float
    distill_hard: bool

    def title(self) -> str:
        how = "hard labels" if self.distill_hard else f"T = {self.distill_T:g}"
        return f"distilled from {self.teacher} (α = {self.distill_alpha:g}, {how})"


@dataclass(frozen=True)
class ComputeSpec:
    threads: int
    devices: int
    num_nodes: int
    strategy: str
    compile: bool  # torch.compile the model (lightning.COMPILED: where it was measured to help)

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def _view(cls, p: dict):
    return cls(**{f.name: p[f.name] for f in fields(cls)})


@dataclass
class Run:
    """One planned training of a report: its checked parameters (per_model and variants applied),
    flat for its identity and its log, and the typed objects read from them."""

    params: dict

    dataset = property(lambda self: self.params["dataset"])
    model = property(lambda self: self.params["model"])
    transform = property(lambda self: self.params["transform"])
    seq_len = property(lambda self: self.params["seq_len"])
    experiment = property(lambda self: self.params["experiment"])
    resume = property(lambda self: self.params["resume"])
    variant = property(lambda self: self.params.get("variant", ""))  # its `variants` entry's name

    @cached_property
    def data(self) -> DataSpec:
        return _view(DataSpec, self.params)

    @cached_property
    def sequence(self) -> SequenceSpec:
        return _view(SequenceSpec, self.params)

    @cached_property
    def network(self) -> ModelSpec:
        return _view(ModelSpec, self.params)

    @cached_property
    def train(self) -> TrainSpec:
        return _view(TrainSpec, self.params)

    @cached_property
    def distill(self) -> DistillSpec:
        return _view(DistillSpec, self.params)

    @cached_property
    def compute(self) -> ComputeSpec:
        return _view(ComputeSpec, self.params)

    def title(self, with_model=True, with_seed=False):
        distilled = [self.distill.title()] if self.distill.teacher else []
        return ", ".join(
            [self.dataset]
            + [self.model] * with_model
            + [self.transform]
            + [f"L = {self.seq_len}"] * bool(self.seq_len)
            + [self.variant] * bool(self.variant)
            + distilled
            + [f"seed {self.train.seed}"] * with_seed
        )

    @property
    def config(self) -> str:
        """What the run is apart from its training seed: runs with the same config are repeats."""
        return json.dumps(
            {**run_identity(self.params), "seed": None, "variant": self.variant},
            sort_keys=True,
            default=str,
        )


def takes_seq_len(transform):
    import inspect

    return (
        transform in SEQUENCES and "seq_len" in inspect.signature(SEQUENCES[transform]).parameters
    )


def plan_runs(datasets, transforms, seq_lens, models=(None,)):
    """(dataset, model, transform, seq_len) for every run of a report; transforms whose length the
    image fixes (rows, pixels, patches, crops) run once, with seq_len None."""
    return [
        (ds, m, tr, L)
        for ds in datasets
        for m in models
        for tr in transforms
        for L in (seq_lens if takes_seq_len(tr) else [None])
    ]


PLANNED = (
    "dataset",
    "model",
    "per_model",
    "per_dataset",
    "variants",
    "extra_runs",
    "experiment",
)  # fixed for a report
PER_RUN = (
    "transform",
    "seq_len",
    "seed",
)  # per_model may set them; a variant may not (it compares at equal input and seeds)
DISTILL = ("distill_alpha", "distill_T", "distill_hard")  # one run per combination of their values
TEACHER_PARAMS = ("teacher_args", "teacher_epochs", *DISTILL)  # meaningless without a teacher
NOT_IN_KEY = (
    "resume",
    "overview_per_class",
    "per_model",
    "per_dataset",
    "variants",
    "variant",
    "experiment",
    "data_dir",
    "extra_runs",
    "tune_study",
    "tune_storage",
    "baseline",
)  # how a run is reported, not what it is


def run_identity(p: dict) -> dict:
    """The parameters that make a run what it is: not how it is reported, and no distillation
    settings for a run without a teacher (so a student's undistilled twin is one run, whatever
    they say)."""
    dropped = NOT_IN_KEY + (TEACHER_PARAMS if not p.get("teacher") else ())
    return {k: v for k, v in p.items() if k not in dropped}


def _check_student(params):
    if params.get("teacher") and not schema.as_list(params.get("model")):
        raise schema.ParamError(
            f"parameter teacher = {params['teacher']!r} is set but model names no student: set "
            f"model to the sequence model(s) to distil into (valid: {list_models()})"
        )


def with_distillation(p: dict) -> list:
    """The runs' parameters for one student: without a teacher, p; with one, its undistilled twin
    (teacher "", same epochs and everything else) and then one run per combination of the values
    of DISTILL."""
    first = {k: schema.as_list(p[k])[0] for k in DISTILL}
    if not p["teacher"]:
        return [{**p, **first}]
    combos = itertools.product(*(schema.as_list(p[k]) for k in DISTILL))
    runs = [{**p, **dict(zip(DISTILL, c))} for c in combos]
    for q in runs:  # the hard variant has no temperature: one run, whatever distill_T lists
        q["distill_T"] = first["distill_T"] if q["distill_hard"] else q["distill_T"]
    return [{**p, **first, "teacher": ""}] + runs


def _override(p, over, where, fixed, types):
    """`p` updated by the mapping `over` of parameters (not in `fixed`), checked again as a
    whole."""
    over = over or {}
    if not isinstance(over, dict):
        raise schema.ParamError(f"{where} = {over!r}: expected a mapping of parameter: value")
    schema.check_params(over, [k for k in types if k not in fixed], where=f"{where}: ")
    try:
        return schema.check_values({**p, **over}, types)
    except schema.ParamError as e:
        raise schema.ParamError(f"{where}: {e}") from None


def _check_compile(p):
    """compile only for the models where it was measured to help (lightning.COMPILED)."""
    if p["compile"] and p["model"] not in lightning.COMPILED:
        why = lightning.NOT_COMPILED.get(p["model"], "not measured to help it")
        raise schema.ParamError(
            f"parameter compile = True for model {p['model']!r}: {why}; valid for "
            f"{sorted(lightning.COMPILED)} only"
        )


def _check_overrides(p, types, name, field, registry, valid, kind):
    """`name` (per_model, per_dataset) names entries of `registry`; the overrides of those this
    report does not run are checked too (kept for other reports: -p dataset imagenette)."""
    unknown = sorted(set(p[name]) - set(registry))
    if unknown:
        raise schema.ParamError(
            f"{name} names {unknown}, which are not {kind}: valid names are {valid()}"
        )
    for key in set(p[name]) - set(schema.as_list(p[field])):
        _override({**p, field: key}, p[name][key], f"{name}[{key!r}]", PLANNED, types)


def _plan_grid(p: dict, types: dict) -> list:
    """The runs of one grid: dataset x model x variant x transform x seq_len x distillation
    settings, with `per_model` and `per_dataset` overrides and then each `variants` entry's
    applied and checked."""
    _check_overrides(p, types, "per_model", "model", MODELS, list_models, "models")
    _check_overrides(p, types, "per_dataset", "dataset", DATASETS, list_datasets, "datasets")
    per_model = {
        m: _override({**p, "model": m}, p["per_model"].get(m), f"per_model[{m!r}]", PLANNED, types)
        for m in schema.as_list(p["model"])
    }
    planned = {}  # (dataset, model, variant) -> parameters
    for ds in schema.as_list(p["dataset"]):
        for m, model_params in per_model.items():
            over = p["per_dataset"].get(ds)
            base = _override(model_params, over, f"per_dataset[{ds!r}]", PLANNED, types)
            for v, over in (p["variants"] or {"": {}}).items():
                q = _override(base, over, f"variants[{v!r}]", PLANNED + PER_RUN, types)
                planned[ds, m, v] = q
                _check_compile(q)
    return [
        Run(q)
        for (ds, m, v), base in planned.items()
        for _, _, tr, L in plan_runs(
            [ds], schema.as_list(base["transform"]), schema.as_list(base["seq_len"])
        )
        for q in with_distillation(
            {**base, "dataset": ds, "transform": tr, "seq_len": L, "variant": v}
        )
    ]


def with_seeds(runs) -> list:
    """One run per training seed of each run, seed-major: the first seed of every configuration
    comes before the second of any, so a report stopped early holds whole seeds."""
    per = [[Run({**r.params, "seed": s}) for s in schema.as_list(r.params["seed"])] for r in runs]
    depth = max(map(len, per), default=0)
    return [seeds[i] for i in range(depth) for seeds in per if i < len(seeds)]


def plan_report(params: dict, types: dict = None) -> list:
    """Every run of a report, each with its parameters checked, `per_model` overrides (e.g.
    {"pit": {"epochs": 1}}), `variants` and `extra_runs` grids included, so that a bad value in
    the last run fails before the first; a run planned twice (e.g. a shared undistilled twin)
    runs once."""
    types = types or schema.types()
    schema.check_params(params, types)
    _check_student(params)
    p = schema.check_values(params, types)
    runs = _plan_grid(p, types)
    for i, extra in enumerate(p["extra_runs"]):
        where = f"extra_runs[{i}]: "
        if not isinstance(extra, dict):
            raise schema.ParamError(f"{where}{extra!r}: expected a mapping of parameter: value")
        schema.check_params(
            extra, [k for k in types if k not in ("extra_runs", "experiment")], where=where
        )
        try:
            _check_student({**p, **extra})
            runs += _plan_grid(schema.check_values({**p, **extra}, types), types)
        except schema.ParamError as e:
            raise schema.ParamError(f"{where}{e}") from None
    unique = {}
    for r in with_seeds(runs):
        unique.setdefault(json.dumps(run_identity(r.params), sort_keys=True, default=str), r)
    return list(unique.values())


def load_report_data(runs) -> dict:
    """Each dataset of a report loaded once (per image policy), by data_key."""
    loaded = {}
    for run in runs:
        if run.data.key not in loaded:
            print(f"loading {run.dataset} ...", flush=True)
            loaded[run.data.key] = run.data.load()
    return loaded


def fit_channels(runs, loaded):
    """An image model reads as many channels as its images have (MNIST: 1) unless its model_args
    name them; the argument is added only where it differs from the model's default (3), so a
    run on colour images keeps its identity."""
    import inspect

    for run in runs:
        default = inspect.signature(MODELS[run.model].factory).parameters.get("channels")
        channels = loaded[run.data.key].image_shape[0]
        args = run.params["model_args"]
        if default is None or "channels" in args or channels == default.default:
            continue
        run.params["model_args"] = {**args, "channels": channels}
        run.__dict__.pop("network", None)  # the cached ModelSpec, read again from the params


def _check_model(spec: ModelSpec, T, n_feat, n_classes):
    """The run's model built with its model_args and initialised with its init."""
    try:
        model = create_model(
            spec.model, in_features=n_feat, num_classes=n_classes, **spec.model_args
        )
    except (ValueError, TypeError, RuntimeError) as e:
        raise schema.ParamError(
            f"model_args {spec.model_args} for model {spec.model!r} on {T} steps "
            f"of {n_feat} features: {e}"
        ) from None
    try:
        INITS[spec.init](model)
    except ValueError as e:
        raise schema.ParamError(
            f"parameter init = {spec.init!r} for model {spec.model!r}: {e}"
        ) from None


def check_run_inputs(runs, loaded):
    """Each run's transform and model arguments against its images: a patch that does not fit or
    a bad model argument fails now, not after the runs before it have trained."""
    built = set()
    for run in runs:
        data, targs = loaded[run.data.key], run.sequence.args
        try:
            T, n_feat = sequence_shape(run.transform, data.image_shape, run.seq_len, **targs)
        except (ValueError, TypeError, RuntimeError) as e:
            raise schema.ParamError(
                f"transform_args {targs} for transform {run.transform!r} on "
                f"{_size(data)} images: {e}"
            ) from None
        key = (n_feat, len(data.classes), repr(run.network))
        if key not in built:
            _check_model(run.network, T, n_feat, len(data.classes))
            built.add(key)
        _check_teacher(run.distill, data, built)


def _size(data) -> str:
    return "x".join(map(str, data.image_shape))


def _check_teacher(d: DistillSpec, data, built):
    key = ("teacher", d.teacher, data.image_shape, len(data.classes), repr(d.teacher_args))
    if not d.teacher or key in built:
        return
    try:
        build_teacher(d.teacher, d.teacher_args, data.image_shape, len(data.classes))
    except (ValueError, TypeError, RuntimeError) as e:
        raise schema.ParamError(
            f"teacher_args {d.teacher_args} for teacher {d.teacher!r} on {_size(data)} images: {e}"
        ) from None
    built.add(key)
