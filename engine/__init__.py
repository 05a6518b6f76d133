"""dv3 engine: the DeBERTa-v3 model, RTD pretraining with ES/NES/GDES, training, export, CLI."""

__version__ = "0.1.0"


def _require_dv3_kernels() -> None:
    """Fail early, and say how to fix it, when ``import kernels`` finds someone else's package.

    Hugging Face ships an unrelated package also called ``kernels``; both cannot live in one
    environment.
    """
    import kernels

    if not getattr(kernels, "DV3_KERNELS", False):
        location = getattr(kernels, "__file__", None) or list(getattr(kernels, "__path__", []))
        raise ImportError(
            f"`import kernels` found a package at {location} that is not dv3's kernels "
            "(most likely Hugging Face's `kernels` package, which has the same name). "
            "Install dv3 in its own environment: `python3 -m venv .venv && .venv/bin/pip install -e .` "
            "(or `make install`), or `pip uninstall kernels` in this one."
        )


_require_dv3_kernels()
