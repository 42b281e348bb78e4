"""bimcv-fetch: download, verify and unpack the BIMCV-COVID19 dataset."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "download"]


def download(*args: Any, **kwargs: Any) -> Any:
    """See :func:`bimcv_fetch.api.download` (imported lazily to keep the CLI fast)."""
    from bimcv_fetch.api import download as _download

    return _download(*args, **kwargs)
