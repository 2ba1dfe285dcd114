"""The ``layerscope`` command.

Each pipeline stage is a command here, and ``dvc.yaml`` calls exactly these
commands. Paths default to the ``paths`` in ``dvc.yaml``'s ``vars``, so they
are written in one place.

One error boundary (:func:`user_errors`) wraps every command:

* a :class:`~pipeline.errors.LayerscopeError` (raised where the cause is known:
  a bad param, a missing, damaged or mismatched file) prints one ``error:`` line,
  exit code 2;
* the machine refusing a write (disk full, read-only file system) prints one
  line naming the file, exit code 2;
* anything else is a bug: one line saying so, the traceback saved to a file,
  exit code 1.

``--debug`` (or ``LAYERSCOPE_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from typer._click import exceptions as click_errors  # typer vendors click: what its commands raise
from typer.core import TyperGroup

from pipeline.errors import LayerscopeError


class OneLineGroup(TyperGroup):
    """The root command: click's usage errors (an unknown option, a bad option value) as one ``error:`` line too.

    Click would print the usage, a "Try --help" line and a boxed message; a
    user mistake gets the same single line everywhere, with the help command as its hint.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help())
            sys.exit(0)
        except click_errors.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "layerscope"
            _print_error(f"{exc.format_message().rstrip('.')} ({command}). Hint: `{command} --help` lists its "
                         "options and arguments.")
            sys.exit(exc.exit_code)
        except click_errors.ClickException as exc:
            _print_error(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:
            _print_error("Aborted.")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(cls=OneLineGroup, help="OOD detection from a classifier's intermediate layers.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
console = Console()
err_console = Console(stderr=True)


def run():
    """The ``layerscope`` console script (and ``python -m pipeline``): :data:`app`, then a quick exit.

    Interpreter shutdown tears down every module that torch, scipy and
    scikit-learn loaded, one by one: 0.3 to 0.8 s per command, paid again by
    each stage of a pipeline. Once a command has returned and its output is
    flushed, that teardown has nothing left to do, so the process leaves at
    once. When something does need the normal exit (see :func:`_needs_clean_exit`),
    it gets it.
    """
    try:
        app(prog_name="layerscope")
        code = 0
    except SystemExit as exc:
        code = exc.code
    if not isinstance(code, int):  # None (success) or a message, as sys.exit would print it
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    if _needs_clean_exit():
        sys.exit(code)
    logging.shutdown()  # flushes and closes every handler, as the normal exit would
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _needs_clean_exit() -> bool:
    """Whether anything still running depends on the interpreter's normal shutdown.

    A non-daemon thread would be joined; a ``weakref.finalize`` registered for
    exit (a temporary directory left for cleanup) would run; loky's reusable
    process pool (``search``) stops its workers and their resource tracker at exit.
    """
    import threading
    import weakref

    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        return True
    if any(info.atexit for info in weakref.finalize._registry.values()):  # private: there is no public view
        return True
    loky = sys.modules.get("joblib.externals.loky.reusable_executor")
    return loky is not None and getattr(loky, "_executor", None) is not None

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="The params file.")
FeaturesOpt = typer.Option(None, help="Feature store: a path or an fsspec URL [paths.features].")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
         quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only."),
         debug: bool = typer.Option(False, "--debug", help="Show tracebacks (also LAYERSCOPE_DEBUG=1).")):
    """OOD detection from a classifier's intermediate layers (a DVC pipeline)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if debug:
        os.environ[DEBUG_ENV] = "1"
    # before torch, numpy or dask load: they size their thread pools from the environment once
    from pipeline.threads import use_threads

    use_threads("auto")


DEBUG_ENV = "LAYERSCOPE_DEBUG"
# errors of the machine, not of layerscope: a full disk, a quota, a read-only file system, no permission
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def user_errors(func):
    """The error boundary: one ``error:`` line for what the user can fix, a bug report for the rest."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, click_errors.ClickException):
            raise
        except LayerscopeError as exc:
            _fail(exc, str(exc), 2)
        except OSError as exc:
            if exc.errno not in _WRITE_ERRNOS:
                _bug(exc)
            where = f" '{exc.filename}'" if exc.filename else ""
            _fail(exc, f"Cannot write{where}: {exc.strerror}. Hint: free some space, or fix the permissions, or "
                       "choose another output path.", 2)
        except KeyboardInterrupt:
            _fail(None, "Interrupted. Nothing half-written was published; rerun the same command to resume.", 130)
        except Exception as exc:  # not a user mistake: a bug, reported as one (with its traceback kept)
            _bug(exc)

    return wrapper


def _fail(exc, message: str, code: int):
    if exc is not None and os.environ.get(DEBUG_ENV) == "1":
        raise exc
    _print_error(message)
    raise typer.Exit(code) from None


def _print_error(message: str):
    """One line on stderr: ``error: <message>`` (whitespace collapsed, never wrapped)."""
    from rich.markup import escape

    # escaped: messages hold brackets ("[0, 1]", "[paths.model]") that rich would read as markup
    err_console.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)


def _bug(exc: BaseException):
    if os.environ.get(DEBUG_ENV) == "1":
        raise exc
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="layerscope-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(traceback.format_exception(exc)))
    _fail(None, f"This is a bug in layerscope, please report it: {type(exc).__name__}: {exc}. "
                f"Hint: attach the traceback saved in {path} (or rerun with --debug to see it).", 1)


def _path(value, key):
    """An explicit option wins; otherwise the path named ``key`` in dvc.yaml's vars.

    A feature store may be an fsspec URL (``s3://bucket/features.zarr``): URLs stay strings.
    """
    from pipeline.config import project_paths
    from pipeline.artifacts import location

    if value is not None:
        return location(value)
    paths = project_paths()
    if key not in paths:
        from pipeline.errors import ConfigError

        raise ConfigError(f"'dvc.yaml' has no paths.{key} under 'vars' (it has {sorted(paths)}). Hint: pass the "
                          f"path as an option, or add paths.{key} as the project's dvc.yaml does.")
    return Path(paths[key])


def _logs_dir():
    """Where measurements go (``paths.logs``); None outside a project: then they are only logged."""
    from pipeline.config import project_paths
    from pipeline.errors import ConfigError

    try:
        return Path(project_paths()["logs"])
    except (ConfigError, KeyError):
        return None


def _model_to_check(value):
    """The checkpoint a stage checks the store against: an explicit --model (which must exist), else
    paths.model if it exists.

    None (no check) when there is no default checkpoint (a store copied without its model, or every
    other path given outside a project): scoring never needs the network.
    """
    from pipeline.errors import ConfigError

    if value is not None:
        return value
    try:
        default = _path(None, "model")
    except ConfigError:  # no dvc.yaml here: the other paths were all given as options
        return None
    if default.is_file():
        return default
    logging.getLogger(__name__).info("no checkpoint at %s: the store is not checked against a model", default)
    return None


ModelCheckOpt = typer.Option(None, "--model", help="The checkpoint the store must have been extracted with "
                             "(its SHA-256 is compared) [paths.model; not checked if absent].")


@app.command()
@user_errors
def init(preset: str = typer.Option(None, "--preset", "-p", help="A preset in configs/ (see --list)."),
         overrides: list[str] = typer.Option(None, "--set-param", "-S", help="section.key=value (YAML value); "
                                             "repeatable."),
         params: Path = ParamsOpt,
         configs: Path = typer.Option(Path("configs"), help="The presets directory."),
         list_: bool = typer.Option(False, "--list", help="List the presets and exit.")):
    """Switch the pipeline to a preset (and/or set params), validated; then run `dvc repro`."""
    from pipeline.errors import ConfigError
    from pipeline.presets import init_params, list_presets

    if list_:
        table = Table("preset", "set-up", title=f"presets in {configs}/")
        for name, description in list_presets(configs).items():
            table.add_row(name, description)
        console.print(table)
        return
    if preset is None and not overrides:
        raise ConfigError("Nothing to do: pass --preset NAME and/or -S section.key=value. Hint: `layerscope init "
                          "--list` shows the presets.")
    init_params(preset, overrides or (), directory=configs, out=params)


@app.command()
@user_errors
def inputs(params: Path = ParamsOpt,
           generate_out: Path = typer.Option(None, "--generate", help="[paths.inputs_generate]"),
           train_out: Path = typer.Option(None, "--train", help="[paths.inputs_train]")):
    """Fingerprint by content what DVC cannot see: the data under generate.root, train.checkpoint/weights."""
    from stages import inputs as stage

    stage.run(params, _path(generate_out, "inputs_generate"), _path(train_out, "inputs_train"))


@app.command()
@user_errors
def generate(params: Path = ParamsOpt, out: Path = typer.Option(None, help="Data directory [dvc.yaml: paths.data].")):
    """Write the benchmark: the embedded digits images, or index files over your data (generate.benchmark)."""
    from stages import generate as stage

    stage.run(params, _path(out, "data"))


@app.command()
@user_errors
def train(params: Path = ParamsOpt, data: Path = typer.Option(None, help="[paths.data]"),
          model: Path = typer.Option(None, help="Checkpoint to write [paths.model]."),
          metrics: Path = typer.Option(None, help="Training metrics JSON [paths.train_metrics].")):
    """Train the backbone on ID-train and report ID accuracy."""
    from stages import train as stage

    stage.run(params, _path(data, "data"), _path(model, "model"), _path(metrics, "train_metrics"))


@app.command()
@user_errors
def extract(params: Path = ParamsOpt, data: Path = typer.Option(None, help="[paths.data]"),
            model: Path = typer.Option(None, help="[paths.model]"),
            out: str = typer.Option(None, help="Feature store: a path or an fsspec URL [paths.features].")):
    """Extract pooled activations, energies and logits into the Zarr feature store."""
    from stages import extract as stage

    stage.run(params, _path(data, "data"), _path(model, "model"), _path(out, "features"))


@app.command()
@user_errors
def fit(params: Path = ParamsOpt, features: str = FeaturesOpt,
        out: Path = typer.Option(None, help="Fitted detectors [paths.detectors]."),
        model: Path = ModelCheckOpt):
    """Fit the configured detectors on every layer's ID-train features."""
    from stages import fit as stage

    stage.run(params, _path(features, "features"), _path(out, "detectors"), model=_model_to_check(model))


@app.command()
@user_errors
def detect(params: Path = ParamsOpt, features: str = FeaturesOpt,
           detectors: Path = typer.Option(None, help="[paths.detectors]"),
           metrics: Path = typer.Option(None, help="Headline metrics, what DVC shows [paths.metrics]."),
           detail: Path = typer.Option(None, help="Every method, layer and OOD set [paths.detail]."),
           table: Path = typer.Option(None, help="[paths.per_layer]"),
           figures: Path = typer.Option(None, help="[paths.figures]"),
           argmax: Path = typer.Option(None, help="Per-layer argmax counts [paths.layer_argmax]."),
           model: Path = ModelCheckOpt):
    """Score ID-test and every OOD test set; write metrics, the per-layer table and figures."""
    from stages import detect as stage

    stage.run(params, _path(features, "features"), _path(detectors, "detectors"), _path(metrics, "metrics"),
              _path(table, "per_layer"), _path(figures, "figures"), _path(argmax, "layer_argmax"),
              model=_model_to_check(model), detail_out=_path(detail, "detail"))


@app.command()
@user_errors
def search(params: Path = ParamsOpt, features: str = FeaturesOpt,
           out: Path = typer.Option(None, help="Leaderboard directory [paths.search]."),
           grid: Path = typer.Option(None, help="A YAML file with the keys of params.yaml's search section.")):
    """Search hyperparameters on the cached store: select on val, report winners on test."""
    from pipeline.search import selection_key
    from stages import search as stage

    rows, cfg = stage.run(params, _path(features, "features"), _path(out, "search"), grid, logs=_logs_dir())
    key = selection_key(cfg.metric, cfg.recall)  # "auroc" or "fpr@95"
    table = Table("method", "column", "params", f"val {key}", "val near", "val far", "test near",
                  "test far", "s/config", title=f"search: top {cfg.top} of {len(rows)} rows (selected on val)")
    for row in rows[:cfg.top]:
        table.add_row(row["method"], row["column"], row["params"], *(_fmt(row[k]) for k in (
            f"val_{key}_mean", f"val_{key}_near", f"val_{key}_far", f"test_{key}_near", f"test_{key}_far",
            "seconds")),
            style="bold" if row["selected"] else None)
    console.print(table)


def _fmt(value):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}"
    return "" if value is None else str(value)


@app.command()
@user_errors
def calibrate(params: Path = ParamsOpt, features: str = FeaturesOpt,
              detectors: Path = typer.Option(None, help="[paths.detectors]"),
              out: Path = typer.Option(None, help="Thresholds file [paths.guard]."),
              model: Path = ModelCheckOpt):
    """Calibrate the early-exit guard's per-layer thresholds on cached ID-val scores (no re-inference)."""
    from stages import calibrate as stage

    content = stage.run(params, _path(features, "features"), _path(detectors, "detectors"), _path(out, "guard"),
                        model=_model_to_check(model))
    table = Table("layer", "threshold", "ID false-alarm budget",
                  title=f"guard: {content['detector']}, ID-val TPR {content['val_tpr']:.4f} "
                        f"(target {content['target_tpr']})")
    for layer in content["layers"]:
        table.add_row(layer, f"{content['thresholds'][layer]:.4g}", f"{content['budgets'][layer]:.4f}")
    console.print(table)


guard_app = typer.Typer(help="Deploy the detector: the early-exit guarded model.", no_args_is_help=True)
app.add_typer(guard_app, name="guard")


@guard_app.command("evaluate")
@user_errors
def guard_evaluate(features: str = FeaturesOpt, detectors: Path = typer.Option(None, help="[paths.detectors]"),
                   thresholds: Path = typer.Option(None, help="[paths.guard]"),
                   model: Path = typer.Option(None, help="[paths.model]"),
                   out: Path = typer.Option(None, help="Report JSON [paths.guard_report]."),
                   recall: float = typer.Option(0.95, help="OOD recall of the FPR (0.95: FPR@95).")):
    """The cascade on the cached test splits: AUROC, FPR@95, achieved ID TPR and the FLOPs saved."""
    from pipeline.metrics import fpr_key
    from stages import guard as stage

    r = stage.run(_path(features, "features"), _path(detectors, "detectors"), _path(thresholds, "guard"),
                  _path(model, "model"), _path(out, "guard_report"), recall=recall)
    fpr = fpr_key(recall)
    table = Table("test set", "AUROC", "FPR" + fpr[3:], "flagged", "FLOPs saved", *r["layers"], "none",
                  title=f"guard ({r['detector']} on {len(r['layers'])} layers): ID-test TPR {r['id_test_tpr']:.4f}, "
                        f"target {r['target_tpr']}, ID-val {r['val_tpr']:.4f}; exits per layer")
    rows = {"id_test": {**r["id_test"], "role": "id"}, **r["sets"]}
    for name, row in rows.items():
        table.add_row(f"{name} ({row['role']})", _fmt(row.get("auroc")), _fmt(row.get(fpr)), _fmt(row["flagged"]),
                      _fmt(row["flops_saved"]), *(_fmt(row["exits"][k]) for k in [*r["layers"], "none"]))
    console.print(table)


@guard_app.command("predict")
@user_errors
def guard_predict(inputs: Path = typer.Argument(..., help="A folder of images, or a .pt/.npy file (n, C, H, W)."),
                  model: Path = typer.Option(None, help="[paths.model]"),
                  detectors: Path = typer.Option(None, help="[paths.detectors]"),
                  thresholds: Path = typer.Option(None, help="[paths.guard]"),
                  out: Path = typer.Option(None, help="Write the results as JSON here (default: print a table)."),
                  batch_size: int = typer.Option(256, min=1), device: str = typer.Option("auto")):
    """Run inputs through the guarded model: a prediction, or "OOD at layer k", per input."""
    import json

    from pipeline.artifacts import atomic_write, check_file_output
    from pipeline.deploy import load_guard, read_inputs
    from pipeline.models import resolve_device

    if out is not None:
        check_file_output(out, "predictions")  # before the model runs
    guard = load_guard(_path(model, "model"), _path(detectors, "detectors"), _path(thresholds, "guard"),
                       device=resolve_device(device))
    names, x = read_inputs(inputs, guard.input_shape)
    records = []
    for start in range(0, len(x), batch_size):
        records += guard(x[start:start + batch_size]).records()
    records = [{"input": name, **rec} for name, rec in zip(names, records)]
    if out is not None:
        atomic_write(out, json.dumps(records, indent=2) + "\n")
        logging.getLogger(__name__).info("wrote %d predictions to %s", len(records), out)
        return
    table = Table("input", "result", "layers computed", *guard.layers, title=f"guard predict: {inputs}")
    for rec in records:
        result = f"OOD at {rec['ood_at_layer']}" if rec["ood_at_layer"] else f"class {rec['prediction']}"
        table.add_row(rec["input"], result, str(rec["layers_computed"]),
                      *(_fmt(rec["scores"].get(layer)) for layer in guard.layers))
    console.print(table)


@app.command()
@user_errors
def summary(detail: Path = typer.Option(None, "--detail", "--metrics", help="The detail file detect writes "
                                        "[paths.detail]."),
            all_columns: bool = typer.Option(False, "--all", help="Every layer, not only the headline columns."),
            layer: str = typer.Option(None, help="The layer shown for per-layer detectors (default: the "
                                      "penultimate, as OpenOOD reports Mahalanobis and KNN)."),
            sets: list[str] = typer.Option(None, "--set", help="OOD test sets to show instead of the near/far "
                                           "means; repeatable."),
            exps: bool = typer.Option(False, "--exps", help="Compare the DVC experiments (`dvc exp show`): mean "
                                      "± std over runs that differ only by train.seed."),
            methods: list[str] = typer.Option(None, "--method", help="With --exps: the methods to show; "
                                              "repeatable."),
            over: list[str] = typer.Option(None, "--over", help="With --exps: the params runs may differ by "
                                           "within a group (default train.seed; e.g. train.checkpoint for "
                                           "OpenOOD's s0/s1/s2 checkpoints); repeatable.")):
    """Print the headline results: near/far AUROC and FPR per method (--exps: per experiment, over seeds)."""
    if exps:
        return _summary_exps(methods or [], over or ["train.seed"])
    from pipeline.errors import DataError
    from pipeline.metrics import fpr_key
    from pipeline.report import GROUPS, read_detail, summary_rows

    path = _path(detail, "detail")
    data = read_detail(path)
    recall = data.get("recall", 0.95)
    fpr = "FPR" + fpr_key(recall)[3:]  # FPR@95
    rows = summary_rows(data["methods"], all_columns=all_columns, head=data.get("head"), layer=layer,
                        groups=sets or GROUPS, recall=recall)
    available = sorted({k for cols in data["methods"].values() for per in cols.values() for k in per} - set(GROUPS))
    for name in sets or ():
        if name not in available:
            raise DataError(f"OOD set '{name}' is not in '{path}'. It has {available}. Hint: pass one of them to --set.")
    if layer is not None and not any(layer in cols for cols in data["methods"].values()):
        raise DataError(f"Layer '{layer}' is not a column of '{path}'. Hint: `layerscope summary --all` lists them.")
    groups = sets or GROUPS
    table = Table("method", "column", *(f"{m} {g}" for g in groups for m in ("AUROC", fpr)),
                  title=f"{path} (ID accuracy {data['id_accuracy']:.4f}; {fpr} = ID FPR at "
                        f"{fpr[4:]}% OOD recall)")
    for row in rows:
        table.add_row(row["method"], row["column"], *(_fmt(row.get(f"{m}_{g}")) for g in groups
                                                     for m in ("auroc", "fpr")))
    console.print(table)


def _summary_exps(methods, over):
    """``summary --exps``: every DVC experiment's headline metrics, grouped over the ``over`` params."""
    from pipeline.config import project_paths
    from pipeline.errors import DataError
    from pipeline.experiments import dvc_exp_show, group_runs, parse_runs, summarise, varying_params
    from pipeline.report import headline_methods

    metrics_path = project_paths()["metrics"]
    runs = parse_runs(dvc_exp_show(), metrics_path)
    if not runs:
        raise DataError(f"No run in `dvc exp show` has headline metrics in '{metrics_path}'. Hint: run `dvc repro` "
                        "or `dvc exp run` first.")
    known = sorted({m for r in runs for m in headline_methods(r.metrics)})
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise DataError(f"Method {unknown[0]!r} is not in the experiments' metrics. They have {known}. Hint: pass "
                        "one of them to --method.")
    unknown = [p for p in over if not any(p in r.params for r in runs)]
    if unknown:
        raise DataError(f"--over {unknown[0]!r} is not a param of any run. Hint: pass a dotted params.yaml key, "
                        "e.g. --over train.seed or --over train.checkpoint.")
    groups = group_runs(runs, over)
    varying = varying_params(groups)
    labels = ["\n".join(f"{k}={group.params[k]}" for k in varying) or "(baseline)" for group in groups]
    table = Table(title=f"{len(runs)} runs in {len(groups)} groups: mean ± sample std over "
                        f"{', '.join(over)}, in % as OpenOOD reports them (FPR at each run's detect.recall)")
    table.add_column("params", no_wrap=True)  # they tell the groups apart: never wrapped
    table.add_column("runs (seed)")
    table.add_column("method", no_wrap=True)
    for header in ("AUROC near", "AUROC far", "FPR near", "FPR far"):
        table.add_column(header)
    for group, label in zip(groups, labels):
        names = "\n".join(f"{run.name} ({', '.join(map(str, seed))})" for run, seed in zip(group.runs, group.seeds))
        for i, row in enumerate(summarise(group, methods)):
            fpr = next((k[:-5] for k in row if k.startswith("fpr@") and k.endswith("_near")), "fpr")
            cells = ([_pm(row["id_accuracy"]), "", "", ""] if row["method"] == "id_accuracy" else
                     [_pm(row.get(k)) for k in ("auroc_near", "auroc_far", f"{fpr}_near", f"{fpr}_far")])
            method = "ID acc." if row["method"] == "id_accuracy" else row["method"]
            table.add_row(label if i == 0 else "", names if i == 0 else "", method, *cells)
        table.add_section()
    console.print(table)


def _pm(stat):
    """``(mean, std, n)`` of a fraction in %, OpenOOD's ``91.23±0.41`` (the mean alone for one run)."""
    if stat is None:
        return "-"
    mean, std, n = stat
    return f"{100 * mean:.2f}" if n < 2 else f"{100 * mean:.2f}±{100 * std:.2f}"


@app.command()
@user_errors
def methods():
    """List every method: what it reads from the feature store, whether it is per-layer, and its paper."""
    from pipeline.catalogue import METHODS

    table = Table("name", "reads", "per layer", "configured in", "paper",
                  title=f"{len(METHODS)} methods, all scored from the feature store (no pass through the network)",
                  caption="gram, odin and rankfeat read what extract stored for them (extract.gram, extract.odin, "
                          "extract.rankfeat): each new setting costs a pass through the network at extraction.")
    for name, m in sorted(METHODS.items(), key=lambda item: (item[1].per_layer, item[1].configured_in, item[0])):
        table.add_row(name, ", ".join(m.reads), "yes" if m.per_layer else "", m.configured_in, m.paper)
    console.print(table)


@app.command()
@user_errors
def layers(params: Path = ParamsOpt,
           model: Path = typer.Option(None, help="A checkpoint; default: the configured, untrained backbone.")):
    """List the hookable layer names of the model, with their output shapes."""
    from pipeline.extract import layer_shapes

    net, input_shape = _layers_model(params, model)
    modules = dict(net.named_modules())
    table = Table("layer", "type", "output shape", title="hookable layers (network order)")
    for name, shape in layer_shapes(net, input_shape).items():
        table.add_row(name, type(modules[name]).__name__, " x ".join(map(str, shape)))
    console.print(table)


def _layers_model(params, checkpoint):
    """The model whose layers to list, and one input's shape (C, H, W)."""
    from pipeline.config import load_section
    from pipeline.models import load_checkpoint, untrained_model

    model, input_shape = untrained_model(load_section("generate", params), load_section("train", params))
    if checkpoint is not None:
        return load_checkpoint(checkpoint)[0], input_shape
    return model, input_shape


@app.command()
@user_errors
def inspect(path: str = typer.Argument(None, help="A feature store [paths.features]."),
            layer: str = typer.Option(None, help="A layer (or any array: map.<layer>, image, logits), for --stats."),
            stats: bool = typer.Option(False, "--stats", help="Per-feature statistics of --layer (lazy, with dask)."),
            split: str = typer.Option(None, help="Only this split."),
            max_features: int = typer.Option(32, help="Rows of the per-feature table."),
            as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """Show a feature store: splits, arrays, chunking, sizes and provenance (no data loaded)."""
    import json

    from pipeline.errors import ConfigError
    from pipeline.store import open_store
    from pipeline.storeinfo import layer_stats, stats_tables, summarize_store, summary_tables

    if stats and layer is None:
        raise ConfigError("--stats needs --layer NAME. Hint: `layerscope inspect` lists the layers.")
    store = open_store(_path(path, "features"))
    result = layer_stats(store, layer, split) if stats else summarize_store(store, split)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    tables = stats_tables(result, max_features) if stats else summary_tables(result, console.width)
    for table in tables:
        console.print(table)


@app.command()
@user_errors
def verify(paths: list[str] = typer.Argument(None, help="Feature stores, detectors or benchmark directories "
                                             "(default: those at paths.data, paths.features, paths.detectors)."),
           params: Path = ParamsOpt):
    """Check artifacts completely: every file's SHA-256 against its manifest, every array and detector decoded.

    Exits 2 at the first damage, naming the file and the remedy. With no PATHS,
    checks the project's benchmark, feature store and detectors that exist.
    """
    from pipeline.errors import DataError

    targets = [_verify_target(p) for p in paths] if paths else [
        path for path in (_path(None, key) for key in ("data", "features", "detectors")) if Path(path).exists()]
    if not targets:
        raise DataError("Nothing to verify: none of paths.data, paths.features, paths.detectors exists. "
                        "Hint: run `dvc repro`, or pass the artifacts to check.")
    table = Table("artifact", "kind", "files", "checked", title="layerscope verify: every byte checked")
    for target in targets:
        kind, files, what = _verify_one(target, params)
        table.add_row(str(target), kind, str(files), what)
    console.print(table)


def _verify_target(value: str):
    from pipeline.errors import DataError
    from pipeline.artifacts import is_url, location

    path = location(value)
    if not is_url(path) and not Path(path).exists():
        raise DataError(f"Cannot verify '{path}': it does not exist. Hint: pass a feature store, a detectors "
                        "directory or a benchmark directory.")
    if not is_url(path) and Path(path).is_file():
        raise DataError(f"Cannot verify '{path}': it is a file; layerscope's artifacts are directories. Hint: pass a "
                        "feature store, a detectors directory or a benchmark directory.")
    return path


def _verify_one(path, params):
    """``(kind, files checked, what else was checked)`` of one artifact; raises at the first damage."""
    from pipeline import artifacts
    from pipeline.errors import IntegrityError

    sealed = None if artifacts.is_url(path) else artifacts.read_seal(path, missing_ok=True)
    kind = "feature store" if sealed is None and artifacts.is_url(path) else (sealed or {}).get("kind")
    if kind == "feature store":
        from pipeline.store import verify_store

        done = verify_store(path)
        return kind, done["files"], f"{done['arrays']} arrays decoded ({done['bytes']:,} bytes hashed)"
    if kind == "detectors directory":
        from pipeline.scoring import verify_detectors

        done = verify_detectors(path)
        return kind, done["files"], f"{len(done['detectors'])} detectors x {len(done['layers'])} layers loaded"
    if kind == "benchmark":
        from pipeline.datasets import KIND
        from pipeline.userdata import open_benchmark

        manifest = artifacts.check_sealed(path, KIND, deep=True)
        splits = open_benchmark(path, params=params)
        return kind, len(manifest["files"]), f"{len(splits)} splits opened"
    raise IntegrityError(f"Cannot verify '{path}': it has no readable {artifacts.SEAL}, so it is not an artifact "
                         "layerscope published (or it was written by an older layerscope). Hint: pass a feature "
                         "store, detectors or benchmark directory; rebuild an old one with `dvc repro`.")
