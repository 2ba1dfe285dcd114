"""scikit-learn, imported without pandas: imported (for this effect) before any module of layerscope imports sklearn.

At import, ``sklearn.utils.fixes`` imports pandas when it is installed
(xarray installs it), and binds it to a name nothing reads: every use of
pandas in scikit-learn imports it in the function that takes a DataFrame.
That import is 0.2 s of every ``fit``, ``detect``, ``search``, ``calibrate``
and ``guard`` start (a seventh of it), for a package none of them uses.

So while scikit-learn's first import runs here, pandas stands as not
installed (``None`` in ``sys.modules``), and the stand-in is removed at once:
a later ``import pandas`` (xarray's, or scikit-learn's own in a function
given a DataFrame) imports it for real. Nothing is stood in when pandas or
scikit-learn is loaded already, nor off the main thread, where another
thread's ``import pandas`` could fall in the window.
"""

import importlib
import sys
import threading


def _import_without_pandas():
    loaded = "sklearn.base" in sys.modules or "pandas" in sys.modules
    if loaded or threading.current_thread() is not threading.main_thread():
        importlib.import_module("sklearn.base")
        return
    sys.modules["pandas"] = None  # `import pandas` raises ImportError, as without pandas installed
    try:
        importlib.import_module("sklearn.base")
    finally:
        if "pandas" in sys.modules and sys.modules["pandas"] is None:
            del sys.modules["pandas"]


_import_without_pandas()
