"""Rendering a report: report.ipynb executed by papermill with a params file into
outputs/NAME.ipynb, then NAME.html, which reads like a paper: the code hidden (the notebook keeps
it), the training log folded, the tables fitted to the page."""

from __future__ import annotations

import html
import os
import sys
from pathlib import Path

from seqlab import files, report, schema

LOG_TAG = "log"  # a cell whose printed lines (the training log) are folded in the HTML
PAGE_CSS = """
body { max-width: 1400px; margin: 0 auto; }
.jp-RenderedHTMLCommon table, .rendered_html table { font-size: 12px; }
.jp-OutputArea-output, .output_area { overflow-x: auto; }
details > pre { font-size: 11px; max-height: 40em; overflow: auto; }
"""


def _execute(executed: Path, params: dict):
    """Run the notebook into `executed`; what its cells print (run headers, epoch lines, results)
    goes to this terminal as it comes, and nothing else (no object reprs)."""
    import papermill as pm

    pm.execute_notebook(
        str(files.NOTEBOOK),
        str(executed),
        parameters=params,
        cwd=str(files.ROOT),
        progress_bar=False,
        log_output=False,
        stdout_file=sys.stdout,
        stderr_file=sys.stderr,
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )


def fold_logs(nb):
    """The printed lines of each cell tagged LOG_TAG, folded into one <details> block."""
    import nbformat

    for cell in nb.cells:
        if LOG_TAG not in cell.get("metadata", {}).get("tags", []):
            continue
        text = "".join(
            o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream"
        )
        rest = [o for o in cell.get("outputs", []) if o.output_type != "stream"]
        if text:
            lines = text.count("\n")
            title = f"{cell.metadata.get('summary', 'Log')} ({lines:,} line{'s' * (lines != 1)})"
            folded = (
                f"<details><summary>{html.escape(title)}</summary>"
                f"<pre>{html.escape(text)}</pre></details>"
            )
            rest.insert(0, nbformat.v4.new_output("display_data", data={"text/html": folded}))
        cell.outputs = rest
    return nb


def to_html(notebook: Path) -> Path:
    """NAME.html beside NAME.ipynb: no code, no prompts, training logs folded."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = fold_logs(nbformat.read(str(notebook), as_version=4))
    exporter = HTMLExporter(
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True
    )
    body, _ = exporter.from_notebook_node(nb)
    body = body.replace("</head>", f"<style>{PAGE_CSS}</style>\n</head>", 1)
    return files.write_text(notebook.with_suffix(".html"), body)


def report_name(params_file=None, name=None) -> str:
    return name or (Path(params_file).stem if params_file else "report")


def render_report(params_file=None, overrides=(), out_dir=None, name=None):
    """Execute report.ipynb with a params YAML (+ overrides) into outputs/NAME.ipynb and NAME.html;
    NAME is the params file's name unless given. Every input is checked first. The notebook is
    written under a temporary name and moved into place on success; a failed report goes to
    NAME.failed.ipynb/.html and leaves the last good one untouched (RunsFailed or the error)."""
    params = schema.read_report_params(params_file, overrides)
    schema.check_params(params, schema.SCHEMA)
    name = report_name(params_file, name)
    params.setdefault("experiment", name)
    report.prepare_report({**schema.defaults(), **params})
    out_dir = Path(out_dir or files.outputs())
    out_dir.mkdir(parents=True, exist_ok=True)
    running = out_dir / f".{name}.{os.getpid()}.running.ipynb"
    shown, secrets = files.secrets_apart(params)
    os.environ.update(secrets)  # the kernel's environment: its passwords, kept out of the notebook
    try:
        _execute(running, shown)
    except BaseException:
        if running.exists():
            failed = out_dir / f"{name}.failed.ipynb"
            os.replace(running, failed)
            os.replace(to_html(failed), failed.with_suffix(".html"))
        raise
    executed, page = out_dir / f"{name}.ipynb", to_html(running)
    os.replace(page, executed.with_suffix(".html"))
    os.replace(running, executed)
    return executed, executed.with_suffix(".html")
