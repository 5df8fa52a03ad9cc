"""Packaging beyond pyproject.toml: a regular (non-editable) install carries the top-level configs/
and csrc/ inside the package, as megatron_lite/configs and megatron_lite/csrc, where
``megatron_lite.package_dir`` finds them. An editable install reads them from the checkout."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PACKAGE_DATA_DIRS = ("configs", "csrc")


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in PACKAGE_DATA_DIRS:
            for source in sorted(Path(name).rglob("*")):
                if source.is_file() and "__pycache__" not in source.parts:
                    target = Path(self.build_lib) / "megatron_lite" / source
                    self.mkpath(str(target.parent))
                    self.copy_file(str(source), str(target))


setup(cmdclass={"build_py": BuildWithData})
