"""Native CPU kernels for the output form of a Linear at a few rows: built on first use, optional.

At 1-4 rows per call, every pass of a Linear layer over its weight is memory-bound, and the
eager output form (:class:`~wn_transform.fast.ScaledLinear`) adds four passes over ``v`` to the
plain layer's: the norms, and the projection of the ``v`` gradient (a matmul, then an in-place
per-row correction).  ``kernels.c`` fuses them away: one read of ``v`` gives the forward's
``x @ v'`` and ``||v||^2``, one read of ``v`` and one write give the backward's ``grad_x`` and the
projected ``grad_v`` (see its header for the formulas).

The C source is compiled once per machine and source version with the system C compiler
(``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``, about a second) into a cache folder
(``$WN_TRANSFORM_CACHE``, else ``$XDG_CACHE_HOME/wn_transform``, else ``~/.cache/wn_transform``),
then loaded with ctypes.  Where it cannot be built or loaded (no compiler, a CPU without
AVX2/FMA, a read-only cache) or with ``WN_TRANSFORM_KERNELS=0``, every caller takes the eager
route, which computes the same values up to float rounding; :func:`kernel_status` says which
and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["MAX_ROWS", "KernelStatus", "backward", "forward", "kernel_status", "usable"]

MAX_ROWS = 4  # rows per call the kernels take (kernels.c: WN_MAX_ROWS)
_VERSION = 1  # kernels.c: wn_kernels_version()
_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_STREAM_MIN_ELEMENTS = 1 << 19  # a grad_v of 2 MiB or more is written past the caches (it cannot stay there)
_PLAIN_TYPES = (Tensor, nn.Parameter)  # not FakeTensor or other subclasses, which have no data to point at


@dataclass(frozen=True)
class KernelStatus:
    """Whether the native kernels are in use, the library's path, and if not, why not."""

    available: bool
    path: str | None
    reason: str


_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL | None, KernelStatus] | None = None


def kernel_status() -> KernelStatus:
    """Build (once per machine) and load the kernels if needed; say whether they are in use."""
    return _load()[1]


def usable(rows: Tensor, v: Tensor) -> bool:
    """Whether the kernels take ``rows [R, in]`` against ``v [out, in]``: 1 <= R <= :data:`MAX_ROWS`,
    float32 CPU tensors, ``v`` contiguous, eager mode (a compiler fuses the eager ops itself)."""
    return (0 < rows.shape[0] <= MAX_ROWS and rows.dtype == torch.float32 and v.dtype == torch.float32
            and rows.device.type == "cpu" and v.device.type == "cpu" and v.is_contiguous() and v.numel() > 0
            and type(rows) in _PLAIN_TYPES and type(v) in _PLAIN_TYPES and not torch.compiler.is_compiling()
            and _load()[0] is not None)


def forward(rows: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows @ v', ||v[i]||^2 per unit)``: shapes ``[R, out]`` and ``[out]``, float32; ``rows`` contiguous."""
    lib = _load()[0]
    u = torch.empty(rows.shape[0], v.shape[0], dtype=torch.float32)
    squares = torch.empty(v.shape[0], dtype=torch.float32)
    lib.wn_forward_f32(rows.data_ptr(), v.data_ptr(), u.data_ptr(), squares.data_ptr(), rows.shape[0], v.shape[1],
                       v.shape[0], torch.get_num_threads())
    return u, squares


def backward(grad_u: Tensor, coef: Tensor, rows: Tensor, v: Tensor, *, input_grad: bool) -> tuple[Tensor, Tensor | None]:
    """``(grad_u' @ rows - coef * v, grad_u @ v)``: the projected ``grad_v [out, in]`` and, with
    ``input_grad``, ``grad_x [R, in]`` (else None).  ``grad_u [R, out]``, ``coef [out]``, ``rows [R, in]``:
    contiguous float32."""
    lib = _load()[0]
    grad_u, coef = grad_u.contiguous(), coef.contiguous()  # (an expanded output gradient is not)
    grad_x = torch.empty_like(rows) if input_grad else None  # before grad_v: the heap keeps grad_v's block warm
    grad_v = torch.empty_like(v, memory_format=torch.contiguous_format)
    lib.wn_backward_f32(grad_u.data_ptr(), coef.data_ptr(), rows.data_ptr(), v.data_ptr(), grad_v.data_ptr(),
                        grad_x.data_ptr() if grad_x is not None else None, rows.shape[0], v.shape[1], v.shape[0],
                        torch.get_num_threads(), int(v.numel() >= _STREAM_MIN_ELEMENTS))
    return grad_v, grad_x


def _load() -> tuple[ctypes.CDLL | None, KernelStatus]:
    global _loaded
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _build_and_load()
    return _loaded


def _cache_dir() -> Path:
    if "WN_TRANSFORM_CACHE" in os.environ:
        return Path(os.environ["WN_TRANSFORM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "wn_transform"


def _cpu_fingerprint() -> str:
    """The CPU's feature flags: a library built with -march=native runs only where they match."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build_and_load() -> tuple[ctypes.CDLL | None, KernelStatus]:
    if os.environ.get("WN_TRANSFORM_KERNELS", "1") == "0":
        return None, KernelStatus(False, None, "disabled by WN_TRANSFORM_KERNELS=0")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, KernelStatus(False, None, f"the kernels are written for x86-64 (AVX2, FMA), this is {platform.machine()}")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None, KernelStatus(False, None, f"no C compiler: {os.environ.get('CC', 'cc')!r} is not on PATH (set $CC)")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        source = _SOURCE.read_bytes()
        key = hashlib.sha256(b"\0".join(s.encode() if isinstance(s, str) else s for s in
                                        (source, compiler, version, " ".join(_FLAGS), _cpu_fingerprint()))).hexdigest()[:16]
        path = _cache_dir() / f"kernels-{key}.so"
        if not path.exists():
            error = _compile(compiler, path)
            if error:
                return None, KernelStatus(False, None, error)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as exc:
        return None, KernelStatus(False, None, f"could not build or load the kernels: {exc}")
    if lib.wn_kernels_version() != _VERSION or lib.wn_kernels_max_rows() != MAX_ROWS:
        return None, KernelStatus(False, str(path), f"{path} does not match this version of wn_transform")
    pointer, size, number = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.wn_forward_f32.argtypes = [pointer] * 4 + [size] * 3 + [number]
    lib.wn_backward_f32.argtypes = [pointer] * 6 + [size] * 3 + [number] * 2
    return lib, KernelStatus(True, str(path), f"built from {_SOURCE.name} with {compiler}")


def _compile(compiler: str, path: Path) -> str | None:
    """Compile ``kernels.c`` to ``path`` (atomically: a concurrent process sees all of it or none).
    Returns None, or what went wrong."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".partial")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", partial], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            errors = [line for line in lines if "error" in line] or lines or [f"exit status {done.returncode}"]
            return f"{compiler} could not compile {_SOURCE}: {errors[0]}"
        os.replace(partial, path)
        return None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
