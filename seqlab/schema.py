"""The report's parameters, defined once: name, type, default, valid range or choices, help line.

PARAMS is the schema. The notebook's parameters cell is written from it (`parameters_cell`; a test
holds the two equal), the command line, `train`, `tune` and the notebook's setup cell check against
it, and `papermill --help-notebook report.ipynb` prints its help lines. Each parameter belongs to
a group, the typed object a run carries it in (plan.RunConfig).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from seqlstm import (
    AUGMENTS,
    DATASETS,
    INITS,
    _is_image_folder,
    list_datasets,
    list_models,
    list_sequences,
)
from seqlab import lightning


class ParamError(ValueError):
    """A bad report parameter or params file; the message names it, the value and what is valid."""


@dataclass(frozen=True)
class Param:
    """One report parameter. `type` is written as the parameters cell declares it ("int",
    "Union[int, list]": a list runs one run per value); `ok` and `valid` are its range, as a check
    and as the error message says it; `group` names the typed object that carries it in a run."""

    name: str
    type: str
    default: object
    group: str
    help: str
    ok: Callable = None
    valid: str = ""


def _at_least(low, note=""):
    return dict(ok=lambda v: v >= low, valid=f">= {low}{note}")


# fmt: off
PARAMS = (  # in the order of the notebook's parameters cell: name, type, default, group, help
    Param("dataset", "Union[str, list]", "cifar10", "data",
          "dataset name (seqlstm.py datasets) or ImageFolder path, or a list"),
    Param("seq_len", "Union[int, list]", [5, 10, 20], "sequence",
          "sequence length L, or a list: one run per (dataset, L)", **_at_least(1)),
    Param("transform", "Union[str, list]", "identity", "sequence",
          "image -> sequence transform, or a list (seqlstm.py transforms)"),
    Param("transform_args", "dict", {}, "sequence",
          'transform arguments, e.g. {"patch": 4}, or per transform: '
          '{"pixels": {"order": "snake"}}'),
    Param("model", "Union[str, list]", "bilstm_fc", "model",
          "sequence model, or a list (seqlstm.py models)"),
    Param("model_args", "dict", {}, "model",
          'overrides of the model defaults, e.g. {"cell": "gru", "hidden": 64}'),
    Param("init", "str", "default", "model",
          "recurrent weights: default (PyTorch's) or orthogonal"),
    Param("epochs", "int", 30, "train",
          "training epochs per run", **_at_least(1)),
    Param("batch_size", "int", 256, "train",
          "training images per step", **_at_least(1)),
    Param("eval_batch_size", "int", 0, "train",
          "validation/test images per step (0: 1024, fewer for long sequences)",
          **_at_least(0, " (0: automatic)")),
    Param("lr", "float", 0.002, "train",
          "(peak) learning rate", ok=lambda v: v > 0, valid="> 0"),
    Param("weight_decay", "float", 0.0, "train",
          "L2 penalty of the optimizer", **_at_least(0)),
    Param("grad_clip", "float", 0.0, "train",
          "clip the gradient norm at this value (0: no clipping)",
          **_at_least(0, " (0: no clipping)")),
    Param("label_smoothing", "float", 0.0, "train",
          "label smoothing of the training loss (0: none)",
          ok=lambda v: 0 <= v < 1, valid="in [0, 1)"),
    Param("optimizer", "str", "adam", "train",
          "adam, adamw, sgd (Nesterov momentum 0.9) or rmsprop"),
    Param("schedule", "str", "onecycle", "train",
          "lr per step: onecycle, cosine, warmup_cosine or none"),
    Param("warmup_epochs", "int", 1, "train",
          "linear warm-up epochs of schedule warmup_cosine", **_at_least(0)),
    Param("precision", "Union[str, int]", "32", "train", "Lightning's precision: 32 or bf16-mixed"),
    Param("augment", "str", "flip", "train",
          "training-batch augmentation: none, flip, crop, flip_crop, cutout or flip_crop_cutout"),
    Param("seed", "Union[int, list]", 0, "train",
          "training seed: initialisation, batch order, augmentation, dropout; a list: one run "
          "per seed", **_at_least(0)),
    Param("teacher", "str", "", "distill",
          'distil each student from this model, e.g. fast_cnn ("": none)'),
    Param("teacher_args", "dict", {}, "distill",
          'overrides of the teacher\'s model defaults, e.g. {"widths": [64, 256, 256]}'),
    Param("teacher_epochs", "int", 15, "distill",
          "the teacher's training epochs (recipe: teacher.TEACHER_RECIPE)", **_at_least(1)),
    Param("distill_alpha", "Union[float, list]", 0.9, "distill",
          "weight of the teacher's term in the loss, 0..1; a list: one run each",
          ok=lambda v: 0 <= v <= 1, valid="between 0 and 1"),
    Param("distill_T", "Union[float, list]", 4.0, "distill",
          "softmax temperature of the distillation loss; a list: one run each",
          ok=lambda v: v > 0, valid="> 0"),
    Param("distill_hard", "Union[bool, list]", False, "distill",
          "DeiT's hard-label variant (the teacher's top-1)"),
    Param("image_size", "int", 0, "data",
          "resize every split to image_size x image_size (0: keep)",
          **_at_least(0, " (0: keep the dataset's size)")),
    Param("grayscale", "bool", False, "data",
          "RGB -> one channel of ITU-R 601 luma (the LRA Image task)"),
    Param("channels", "int", 0, "data",
          "3: repeat a 1-channel dataset to 3 channels (0: keep)",
          ok=lambda v: v in (0, 1, 3), valid="0 (keep), 1 or 3"),
    Param("dataset_args", "dict", {}, "data",
          'the dataset\'s own options, e.g. {"labels": "coarse"} for cifar100'),
    Param("val_fraction", "float", 0.1, "data",
          "share of the train split held out for validation (seeded)",
          ok=lambda v: 0 < v < 1, valid="between 0 and 1, both excluded (the best-validation "
          "checkpoint is the one tested)"),
    Param("split_seed", "int", 0, "data",
          "seed of the train/validation split (and of the teacher): fixed across training seeds",
          **_at_least(0)),
    Param("limit_train", "int", 0, "data",
          "use only the first N training images (0: all)",
          **_at_least(0, " (0: all training images)")),
    Param("data_dir", "str", "", "data", "data folder (empty: $SEQLSTM_DATA, else ./data)"),
    Param("threads", "int", 0, "compute",
          "CPU threads (0: all cores; under DDP, per process)", **_at_least(0, " (0: all cores)")),
    Param("devices", "int", 1, "compute",
          "devices per machine; above 1, Lightning DDP (seqlstm.py train)", **_at_least(1)),
    Param("num_nodes", "int", 1, "compute",
          "machines of a DDP run", **_at_least(1)),
    Param("strategy", "str", "auto", "compute", "Lightning strategy: auto or ddp"),
    Param("compile", "bool", False, "compute",
          "torch.compile the model: trellisnet or bilstm_fc only (docs/speed.md)"),
    Param("per_model", "dict", {}, "report",
          'per-model overrides of any parameter, e.g. {"pit": {"epochs": 1}}'),
    Param("per_dataset", "dict", {}, "report",
          'per-dataset overrides, applied after per_model, e.g. {"mnist": {"augment": "none"}}'),
    Param("variants", "dict", {}, "report",
          'named variants, each run for every model, e.g. '
          '{"sgd": {"optimizer": "sgd", "lr": 0.05}}'),
    Param("extra_runs", "list", [], "report",
          'further runs, each a mapping of overrides, e.g. '
          '[{"model": "lstm", "transform": "rows"}]'),
    Param("overview_per_class", "int", 8, "report",
          "train images per class in the data overview (0: none)", **_at_least(0)),
    Param("experiment", "str", "report", "report",
          "MLflow experiment (seqlstm.py report: the params file's name)"),
    Param("baseline", "str", "", "report",
          "the variant (or run) the others are compared with, paired by seed (empty: none)"),
    Param("tune_study", "str", "", "report",
          "an Optuna study to show in a Tuning section (empty: none)"),
    Param("tune_storage", "str", "", "report",
          "its storage: a URL or a journal file (empty: outputs/optuna.db)"),
    Param("resume", "bool", True, "report",
          "reuse a finished identical run, continue a killed one (False: train afresh)"),
)
# fmt: on
SCHEMA = {p.name: p for p in PARAMS}
TYPES = {p.name: p.type for p in PARAMS}


def defaults() -> dict:
    """Every parameter at its default (fresh copies: a caller may change them)."""
    import copy

    return {p.name: copy.deepcopy(p.default) for p in PARAMS}


def types() -> dict:
    """Each parameter's declared type: "int", "Union[str, list]"."""
    return dict(TYPES)


def parameters_cell() -> str:
    """The notebook's parameters cell as the schema writes it: `name: type = default  # help`."""

    def declared(t):
        return t if t in ("int", "float", "str", "bool", "dict", "list") else f'"{t}"'

    return "\n".join(f"{p.name}: {declared(p.type)} = {p.default!r}  # {p.help}" for p in PARAMS)


def from_notebook(namespace: dict, names) -> dict:
    """The report's parameters from the notebook's globals after papermill's injection. `names`
    are the public global names right after the parameters (and injected) cells: one the schema
    does not know was injected by mistake (papermill itself only warns)."""
    try:
        hidden = set(get_ipython().user_ns_hidden)  # noqa: F821 (names IPython defines itself)
    except NameError:
        hidden = set()
    check_params({k: None for k in names if k not in hidden}, SCHEMA)
    return {name: namespace[name] for name in SCHEMA}


class _Yaml12Loader(yaml.SafeLoader):
    """YAML as users type it: PyYAML follows YAML 1.1, where `1e-3` is a string; in YAML 1.2
    (and in every learning rate typed by hand) it is a number."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text, source="<value>"):
    """YAML with 1.2's numbers; a syntax error names `source`, the line and the column."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamError(
            f"{source}{where}: malformed YAML: {getattr(e, 'problem', None) or e}"
        ) from None


def read_params_file(path):
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ParamError(
            f"cannot read params file {path}: {getattr(e, 'strerror', None) or e}"
        ) from None
    params = parse_yaml(text, str(path))
    if not isinstance(params, (dict, type(None))):
        raise ParamError(
            f"{path}: a params file maps parameter names to values, got a {type(params).__name__}"
        )
    return params or {}


def check_params(given: dict, known, where=""):
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ParamError(
            f"{where}unknown parameter(s) {unknown}: valid parameters are {sorted(known)}"
        )


def as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


_KINDS = {
    "int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict) or v is None,
}


def _scalar(name, value, kinds, declared):
    if "float" in kinds and isinstance(
        value, str
    ):  # "1e-3" kept a string by YAML 1.1 or papermill -y
        try:
            value = float(value)
        except ValueError:
            pass
    for kind in kinds:
        if kind not in _KINDS:  # a type this check does not know: taken as given
            return value
        if _KINDS[kind](value):
            return {"float": float, "int": int, "dict": lambda v: v or {}}.get(kind, lambda v: v)(
                value
            )
    raise ParamError(
        f"parameter {name} = {value!r} ({type(value).__name__}): expected {declared}"
        + (" (a finite number)" if "float" in kinds else "")
    )


def typed_param(name, value, declared):
    """`value` as the parameters cell declares `name`: an int where a float is declared becomes a
    float, "1e-3" a number; lists where the declaration allows them, each item checked."""
    kinds = [k.strip() for k in declared.removeprefix("Union[").removesuffix("]").split(",")]
    scalars = [k for k in kinds if k != "list"]
    if [k.lower() for k in kinds] == [
        "list"
    ]:  # a list of anything (extra_runs), checked where it is used
        if not isinstance(value, (list, tuple)):
            raise ParamError(
                f"parameter {name} = {value!r} ({type(value).__name__}): expected a list"
            )
        return list(value)
    if "list" in kinds and isinstance(value, (list, tuple)):
        if not value:
            raise ParamError(f"parameter {name} = []: give at least one value")
        return [_scalar(name, v, scalars, declared) for v in value]
    return _scalar(name, value, scalars, declared)


def param_choices():
    """The named parameters and their valid values, one registry each."""
    return {
        "model": list_models(),
        "teacher": ["", *list_models()],
        "transform": list_sequences(),
        "augment": list(AUGMENTS),
        "optimizer": sorted(lightning.OPTIMIZERS),
        "schedule": list(lightning.SCHEDULES),
        "init": list(INITS),
        "precision": list(lightning.PRECISIONS),
        "strategy": list(lightning.STRATEGIES),
    }


def _check_names(p):
    for name, valid in param_choices().items():
        for value in as_list(p[name]):
            if str(value) not in valid:  # precision 32 as YAML's int
                raise ParamError(f"parameter {name} = {value!r}: valid values are {valid}")
    for ds in as_list(p["dataset"]):
        if ds not in DATASETS and not _is_image_folder(Path(ds)):
            raise ParamError(
                f"parameter dataset = {ds!r}: valid names are {list_datasets()}, or a folder "
                f"with train/ and test/ (or val/) in ImageFolder layout"
            )


PLAIN = (str, bool, int, float, type(None))  # YAML's plain scalars: what a value may hold


def check_plain(where: str, value):
    """`value` holds plain scalars, lists and string-keyed mappings only, at every depth: no bytes
    (YAML's !!binary), dates or other objects, which papermill would write into the notebook's
    code as they are."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            check_plain(f"{where}[{i}]", v)
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ParamError(f"{where}: key {k!r} ({type(k).__name__}): keys must be strings")
            check_plain(f"{where}[{k!r}]", v)
    elif not isinstance(value, PLAIN) or (isinstance(value, float) and not math.isfinite(value)):
        raise ParamError(
            f"parameter {where} = {value!r} ({type(value).__name__}): only strings, "
            f"numbers, booleans, null, lists and mappings are allowed"
        )


def check_values(params: dict, types: dict = None) -> dict:
    """The parameters typed as declared (see typed_param), each in its range and each name known;
    returns them typed (1e-3 as a float)."""
    types = types or TYPES
    for name, value in params.items():
        check_plain(name, value)
    p = {name: typed_param(name, value, types[name]) for name, value in params.items()}
    for param in PARAMS:
        for value in as_list(p.get(param.name, [])) if param.ok else []:
            if not param.ok(value):
                raise ParamError(f"parameter {param.name} = {value!r}: must be {param.valid}")
    _check_names(p)
    if p.get("schedule") == "warmup_cosine" and not p["warmup_epochs"] < p["epochs"]:
        raise ParamError(
            f"parameter warmup_epochs = {p['warmup_epochs']}: must be below epochs "
            f"({p['epochs']}) for schedule warmup_cosine"
        )
    return p


def read_report_params(params_file=None, overrides=()):
    params = read_params_file(params_file) if params_file else {}
    for key, value in overrides:
        params[key] = parse_yaml(value, f"-p {key} {value}")
    return params


def write_parameters_cell(notebook=None):
    """Rewrite the notebook's parameters cell from the schema (after a parameter is added or
    changed here): `python -m seqlab.schema`."""
    import nbformat
    from seqlab import files

    path = str(notebook or files.NOTEBOOK)
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = parameters_cell()
    files.write_text(path, nbformat.writes(nb) + "\n")


if __name__ == "__main__":
    write_parameters_cell()
