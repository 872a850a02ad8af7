"""distnn: data-parallel training of dense feed-forward and recurrent networks over MPI."""

__all__ = ["Network", "Recurrent", "Trainer", "SGD", "Adam", "AdamW", "MLPClassifier", "MLPRegressor",
           "Model", "save_model", "load_model"]
_WHERE = {"Network": "network", "Recurrent": "recurrent", "Trainer": "trainer", "SGD": "optim", "Adam": "optim",
          "AdamW": "optim", "MLPClassifier": "estimators", "MLPRegressor": "estimators",
          "Model": "model", "save_model": "model", "load_model": "model"}


def __getattr__(name):
    # Loaded on first use: `import distnn` costs nothing, so `python -m distnn train` holds its
    # signals from its first line (see __main__.py); and Trainer imports mpi4py, whose import
    # starts MPI, which only code that trains should pay (on some login nodes MPI cannot start);
    # the estimators import scikit-learn, which only their users should pay.
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'distnn' has no attribute {name!r}")


def _version() -> str:
    """The installed distribution's version (pyproject.toml's); "0+unknown" when distnn runs from
    a checkout that was never installed."""
    from importlib import metadata

    try:
        return metadata.version("distnn")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def __dir__():
    return sorted([*globals(), *__all__, "__version__"])
