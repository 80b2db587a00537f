"""seqlab: the machinery around seqlstm.py that turns parameters into tracked, resumable, reusable
runs and reports. It imports seqlstm; seqlstm never imports it. One module per concern:

  files     the outputs folder, checkpoints, inter-process locks, whole-file writes
  schema    the report's parameters, defined once (name, type, default, range, help)
  plan      a report's runs as typed objects (Run: DataSpec, SequenceSpec, ModelSpec, ...)
  fits      whether a run fits in memory, checked before it loads or trains
  lightning the LightningModule, its optimizers, schedules and callbacks; the Trainer
  tracking  every call to MLflow (Tracker), a run's identity
  summary   summary.csv, a row per run, only ever appended to
  figures   plots and tables of runs
  cores     CPU threads and the allocator, and a note when other processes share the cores
  teacher   a distilled run's teacher: trained once, cached, shared through MLflow
  runner    one run: reuse | resume | new -> fit -> evaluate -> track, failures contained
  stats     repeated runs: mean, sd and interval over seeds; comparisons paired by seed
  report    what a report shows: checks before the first run, the tables, the last word
  sections  the report's sections as the notebook draws them (results first, figures with alt text)
  render    report.ipynb executed by papermill into outputs/NAME.ipynb and NAME.html
  studies   where Optuna studies live and how workers share one
  tune      the Optuna search
  bench     speed as ratios measured in one run
  levers    the speed levers (allocator, torch.compile), each against its absence
  timing    medians of timed calls, rates, one training step as a function
  cli       the command line (python seqlstm.py CMD, python -m seqlab CMD)
"""
