"""Build shim: all metadata lives in pyproject.toml.

The CUDA kernels in csrc/ are not built here. They are plain .cu sources compiled at first use on
a GPU machine (NVRTC, loaded through CuPy), so installing needs no CUDA compiler. They are copied into the
package so an installed (non-editable) copy still finds them.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithKernelSources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "lowrank_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        sources = Path(__file__).parent.joinpath("csrc")
        for source in [*sources.glob("*.cu"), *sources.glob("*.cuh")]:  # kernels and their headers
            shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithKernelSources})
