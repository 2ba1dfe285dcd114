"""Exceptions for user mistakes.

Anything derived from :class:`LayerscopeError` is a mistake the user can fix
(a bad parameter, a missing or incomplete file). The CLI prints such errors as a
single line, without a traceback; every other exception is a bug and keeps its
traceback.
"""

import contextlib


class LayerscopeError(Exception):
    """Base class for errors caused by user input, reported in one line."""


class ConfigError(LayerscopeError, ValueError):
    """A parameter has an invalid value (worded the way scikit-learn words it)."""


class DataError(LayerscopeError, ValueError):
    """An input file or array does not have the expected content."""


class StoreError(LayerscopeError):
    """A feature store is missing, incomplete, locked, corrupt or mismatched."""


def invalid_param(name, owner, expected, got, hint=None):
    """Build the standard message for an invalid parameter.

    Parameters
    ----------
    name : str
        The parameter's (dotted) name, e.g. ``"extract.layers"``.
    owner : str
        The estimator, function or stage that owns the parameter.
    expected : str
        What was expected, e.g. ``"one of {'knn', 'ecod'}"``.
    got : object
        The value received; its ``repr`` goes into the message.
    hint : str, optional
        One sentence on how to fix it.

    Returns
    -------
    ConfigError
        Ready to ``raise``.
    """
    msg = f"The '{name}' parameter of {owner} must be {expected}. Got {got!r} instead."
    if hint:
        msg += f" Hint: {hint}"
    return ConfigError(msg)


class ModelError(LayerscopeError):
    """A model cannot be used as asked (e.g. split into blocks at the guarded layers)."""


class IntegrityError(LayerscopeError):
    """An artifact on disk is incomplete or damaged: a file missing, truncated or altered since it was written."""


class OutputError(LayerscopeError):
    """An output path cannot be written as asked: it would destroy something, or it is not writable."""


class ProvenanceError(StoreError):
    """Two artifacts a stage reads do not belong together (fitted, extracted or calibrated from different inputs)."""


def check_constraints(estimator, prefix: str, owner: str):
    """Check ``estimator``'s params against its scikit-learn ``_parameter_constraints``, before any data is seen.

    The wording is scikit-learn's own, with the parameter renamed to where the
    user wrote it: ``The 'detect.methods.scale.percentile' parameter of detect
    must be a float in the range [0, 100). Got 150 instead.``

    Parameters
    ----------
    estimator : sklearn.base.BaseEstimator
        With a ``_parameter_constraints`` class attribute (nothing is checked without one).
    prefix : str
        The dotted path of the estimator's params, ending with a dot (``"fit.detectors.knn."``); may be empty.
    owner : str
        The stage or estimator named in the message.

    Raises
    ------
    ConfigError
    """
    constraints = getattr(type(estimator), "_parameter_constraints", None)
    if constraints:
        params = {name: value for name, value in estimator.get_params(deep=False).items() if name in constraints}
        check_values(constraints, params, type(estimator).__name__, prefix, owner)
    return estimator


def check_values(constraints: dict, params: dict, caller: str, prefix: str, owner: str):
    """``params`` against scikit-learn style ``constraints`` (those of ``caller``), as :func:`check_constraints`."""
    from sklearn.utils._param_validation import InvalidParameterError, validate_parameter_constraints

    try:
        validate_parameter_constraints(constraints, params, caller_name=caller)
    except InvalidParameterError as exc:
        raise ConfigError(_renamed(str(exc), caller, prefix, owner)) from None


def _renamed(message: str, caller: str, prefix: str, owner: str) -> str:
    """scikit-learn's "The 'p' parameter of Caller must be ..." with 'p' as the user wrote it."""
    import re

    return re.sub(rf"^The '(\w+)' parameter of {re.escape(caller)}",
                  lambda m: f"The '{prefix}{m.group(1)}' parameter of {owner}", message)


@contextlib.contextmanager
def in_context(where: str):
    """Prefix a data or parameter error raised inside with where it happened (the layer, split and store read).

    Detectors and scorers see only arrays; the loop that hands them a layer's
    features knows which. The error keeps its class and gains the place, once:
    ``Fitting fit.detectors.knn on layer 'layer3' of split 'id_train' (store
    'cache/features.zarr'): Input X contains NaN. Hint: ...``.
    """
    try:
        yield
    except (DataError, ConfigError) as exc:
        if getattr(exc, "located", False):
            raise
        located = type(exc)(f"{where}: {exc}")
        located.located = True
        raise located from None
