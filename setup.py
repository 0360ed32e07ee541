"""Build of patchslim_ext._C through torch.utils.cpp_extension.

The CPU sources are always built. The CUDA sources are built when the installed
torch has CUDA and nvcc is found; PATCHSLIM_CUDA=0 or 1 forces the choice.
Install with `pip install --no-build-isolation -e .` so the build uses the torch
already installed (build isolation would pull a CUDA torch of several GB).
"""

import os
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as error:  # pragma: no cover - depends on the environment
    raise SystemExit(
        "patchslim_ext builds against an installed torch: install torch first, then run "
        "`pip install --no-build-isolation -e .`"
    ) from error

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _sources(*patterns: str) -> list[str]:
    found = sorted(path for pattern in patterns for path in CSRC.glob(pattern))
    return [str(path.relative_to(ROOT)) for path in found]


def _build_cuda() -> bool:
    requested = os.environ.get("PATCHSLIM_CUDA", "").strip()
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if requested == "0":
        return False
    if requested == "1":
        if not possible:
            raise SystemExit(
                "PATCHSLIM_CUDA=1 but the installed torch has no CUDA or nvcc was not found "
                f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
            )
        return True
    if requested:
        raise SystemExit(f"PATCHSLIM_CUDA must be 0 or 1, got {requested!r}")
    return possible


def _extension():
    with_cuda = _build_cuda()
    sources = _sources("*.cpp", "common/*.cpp", "cpu/*.cpp", "cpu/isa/*.cpp")
    cxx_flags = ["-O3", "-fopenmp", "-fvisibility=hidden"]
    kwargs = {
        "name": "patchslim_ext._C",
        "include_dirs": [str(CSRC)],
        "extra_link_args": ["-fopenmp"],
    }
    if not with_cuda:
        return cpp_extension.CppExtension(
            sources=sources, extra_compile_args={"cxx": cxx_flags}, **kwargs
        )
    sources += _sources("cuda/*.cu", "cuda/*.cpp")
    nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        sources=sources,
        define_macros=[("PATCHSLIM_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        **kwargs,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
