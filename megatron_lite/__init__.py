"""megatron_lite: Megatron-style tensor, pipeline and data parallel GPT pretraining."""

from pathlib import Path

__version__ = "0.1.0"


def package_dir(name: str) -> Path:
    """``configs`` or ``csrc``: the copy inside the installed package (``pip install .`` puts it
    there, see setup.py), else the source checkout's top-level directory (``pip install -e .``)."""
    here = Path(__file__).resolve().parent
    installed = here / name
    return installed if installed.is_dir() else here.parent / name
