"""bimcv-fetch: download, verify and unpack the BIMCV-COVID19 dataset."""

__version__ = "0.1.0"

__all__ = ["__version__"]
