"""Native CPU kernels: the output form of a Linear at a few rows, and the init pass's
per-layer statistics.  Built on first use, optional.

At 1-8 rows per call, every pass of a Linear layer over its weight is memory-bound, and the
eager output form (:class:`~wn_transform.fast.ScaledLinear`) adds four passes over ``v`` to the
plain layer's: the norms, and the projection of the ``v`` gradient (a matmul, then an in-place
per-row correction).  ``kernels.c`` fuses them away: one read of ``v`` gives the forward's
``x @ v'`` and ``||v||^2``, one read of ``v`` and one write give the backward's ``grad_x`` and the
projected ``grad_v`` (see its header for the formulas).

The data-dependent init (:mod:`~wn_transform.data_init`) calibrates each Linear or (transposed) conv from
``t = op(x, v)`` with a dozen small ops (norms, per-unit mean and variance, ``g``, bias, the new
output), each a dispatch, and for a conv a pass over its output; :func:`calibrate` does them in
one call and three passes.

The C source is compiled once per machine and source version with the system C compiler
(``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``, about a second) into a cache folder
(``$WN_TRANSFORM_CACHE``, else ``$XDG_CACHE_HOME/wn_transform``, else ``~/.cache/wn_transform``),
then loaded with ctypes.  Where it cannot be built or loaded (no compiler, a CPU without
AVX2/FMA, a read-only cache) or with ``WN_TRANSFORM_KERNELS=0``, every caller takes the eager
route, which computes the same values up to float rounding; :func:`kernel_status` says which
and why.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.autograd.graph import increment_version

from .errors import warn_user

try:
    import fcntl  # (POSIX: one build at a time per library)
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["MAX_ROWS", "PLAIN_TYPES", "KernelStatus", "backward", "backward_usable", "calibrate", "calibration_usable", "disabled",
           "forward", "kernel_status", "saved_tensors_hooked", "usable"]

MAX_ROWS = 8  # the most rows per call the kernels can take (kernels.c: WN_MAX_ROWS); see _row_limit
_ROWS = 4  # elsewhere than on AMD CPUs: from 5 rows, MKL's matmuls beat the backward's per-row updates of grad_x
_VERSION = 6  # kernels.c: wn_kernels_version()
_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_COMPILE_TIMEOUT = 120  # seconds (a build takes about one)
_FAILURE_MEMORY = 600  # seconds a failed build stops the next processes from trying again
_STALE_AFTER = 2 * (_COMPILE_TIMEOUT + 60)  # seconds after which a partial whose builder is gone is left over
_LOCK_WAIT = _COMPILE_TIMEOUT + 90  # seconds a process waits for another's build (and its load in another process)
_STREAM_MIN_ELEMENTS = 1 << 19  # a grad_v of 2 MiB or more is written past the caches (it cannot stay there)
_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)  # private: may go
PLAIN_TYPES = (Tensor, nn.Parameter)  # not FakeTensor or other subclasses, which have no data to point at


@dataclass(frozen=True)
class KernelStatus:
    """Whether the native kernels are in use, the library's path, and if not, why not; ``rows``: up
    to how many rows per call a large Linear takes them on this CPU (0 when not in use)."""

    available: bool
    path: str | None
    reason: str
    rows: int = 0


_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL | None, KernelStatus] | None = None
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("wn_transform_kernels", default=True)


def kernel_status() -> KernelStatus:
    """Build (once per machine) and load the kernels if needed; say whether they are in use."""
    return _load()[1]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block (this thread or task), every layer takes the eager route: to compare the
    two, or to rule the kernels out when a result looks wrong."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def usable(rows: Tensor, g: Tensor, v: Tensor, bias: Tensor | None) -> bool:
    """Whether the kernels take ``rows [R, in]`` through the layer ``(g [out, 1], v [out, in], bias)``:
    ``in`` the same on both (a mismatch takes the eager route, which raises torch's shape error),
    1 <= R <= :attr:`KernelStatus.rows`, float32 CPU tensors, parameters contiguous, eager mode (a
    compiler fuses the eager ops itself), no CPU autocast (whose matmuls compute in lower precision)."""
    return (not torch.compiler.is_compiling()  # first: a compiler would guard on the rows tested below
            and 0 < rows.shape[0] <= MAX_ROWS and v.numel() > 0 and v.ndim == 2 and rows.shape[1] == v.shape[1]
            and not torch.is_autocast_enabled("cpu") and _ENABLED.get()
            and all(_plain_float32(t) for t in (rows, g, v)) and _in_memory(rows) and v.is_contiguous() and g.is_contiguous()
            and g.numel() == v.shape[0]  # a gain per unit (a broadcast one takes the eager route)
            and (bias is None or (_plain_float32(bias) and _in_memory(bias) and bias.is_contiguous()
                                  and bias.numel() == v.shape[0]))
            and rows.shape[0] <= _load()[1].rows)  # last: only a call the kernels could take builds them


def saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are on (``torch.autograd.graph.saved_tensors_hooks``: activation
    checkpointing, offloading): what a forward saves then comes back through the user's unpack
    hook, so :func:`backward_usable` must check it.  Without torch's query, assume so."""
    return _top_saved_tensors_hooks is None or _top_saved_tensors_hooks(False) is not None


def backward_usable(grad_y: Tensor, rows: Tensor, u: Tensor, safe: Tensor, scale: Tensor, v: Tensor, *,
                    hooked: bool) -> bool:
    """Whether :func:`backward` takes the output gradient and what the forward saved.  A batched
    backward (``vmap``, ``autograd.grad(is_grads_batched=True)``, ``jacobian(vectorize=True)``)
    hands in wrapped tensors with no storage.  ``hooked`` (:func:`saved_tensors_hooked` at the
    forward): the saved tensors came back through an unpack hook, which may give another layout
    or dtype; they must be float32 CPU tensors, ``u [R, out]``, ``safe``/``scale`` ``[out]`` and
    ``v [out, in]`` contiguous, ``rows [R, in]``.  About 1 us without hooks."""
    if (torch._C._are_functorch_transforms_active() or torch._C._functorch.is_legacy_batchedtensor(grad_y)
            or not _in_memory(grad_y)):
        return False
    if not hooked:
        return True
    count, out = rows.shape[0], v.shape[0]
    return (all(_plain_float32(t) for t in (grad_y, rows, u, safe, scale, v))
            and all(t.is_contiguous() for t in (u, safe, scale, v))
            and v.ndim == 2 and rows.shape[-1] == v.shape[1] and tuple(u.shape) == (count, out)
            and safe.numel() == out and scale.numel() == out and grad_y.numel() == count * out)


def calibration_usable(t: Tensor, unit_dim: int, v: Tensor | None, *tensors: Tensor | None) -> bool:
    """Whether :func:`calibrate` takes ``t`` (contiguous, not empty, its units on ``unit_dim``), ``v``
    (``[out, ...]``, contiguous, a unit per row; or None) and ``tensors`` (``g``, the statistics'
    slots, the bias or None; contiguous, one value per unit): float32 CPU tensors, eager mode."""
    out = tensors[0].numel() if tensors and tensors[0] is not None else -1
    return (-t.ndim <= unit_dim < t.ndim and t.shape[unit_dim] == out and t.numel() > 0 and _ENABLED.get()
            and not torch.compiler.is_compiling() and _plain_float32(t) and t.is_contiguous()
            and (v is None or (v.ndim >= 2 and v.shape[0] == out and _plain_float32(v) and v.is_contiguous()))
            and all(x is None or (_plain_float32(x) and x.is_contiguous() and x.numel() == out) for x in tensors)
            and _load()[0] is not None)


def calibrate(t: Tensor, unit_dim: int, v: Tensor | None, g: Tensor, bias: Tensor | None, norm: Tensor, mean: Tensor,
              var: Tensor, *, scale: float, exp_scale: bool, output: bool) -> None:
    """The data-dependent init of one layer from ``t = op(x, v)`` (a Linear's ``x @ v'``, a conv's
    output; units on ``unit_dim``), in one call: ``norm = ||v||`` per row of ``v`` (``v`` None: the
    caller wrote ``norm``, as for a transposed conv, whose units are not rows), ``mean``/``var`` of
    ``t`` per unit (biased; over every other axis), ``g = scale ||v|| / sigma`` (its log with
    ``exp_scale``), ``bias = -scale mean / sigma``; with ``output``, ``t`` becomes the layer's new
    output ``g t/||v|| + b`` in place.  Check :func:`calibration_usable` first.  The version counter
    of every tensor written is bumped, as an in-place op would (caches and autograd's checks read it)."""
    unit_dim %= t.ndim
    out = t.shape[unit_dim]
    outer = math.prod(t.shape[:unit_dim])
    _load()[0].wn_calibrate_f32(t.data_ptr(), v.data_ptr() if v is not None else None, norm.data_ptr(),
                                mean.data_ptr(), var.data_ptr(), g.data_ptr(), bias.data_ptr() if bias is not None else None,
                                outer, out, t.numel() // (outer * out), v.numel() // out if v is not None else 0, scale,
                                int(exp_scale), int(output), torch.get_num_threads())
    for written in (g, bias, norm, mean, var, t if output else None):
        if written is not None:
            increment_version(written)


def _plain_float32(t: Tensor) -> bool:
    return type(t) in PLAIN_TYPES and t.dtype == torch.float32 and t.is_cpu  # (is_cpu: 8x cheaper than device.type)


def _in_memory(t: Tensor) -> bool:
    """Whether ``t``'s values are the floats in its memory, as the kernels read them: a dense tensor,
    not a ZeroTensor (the zero gradient autograd hands out without memory: ``sgn``'s backward) nor one
    whose negation is a flag (``conj``'s backward on a single element), with a float in its storage
    for each element (an expanded tensor, whose elements share their memory, is refused too: the
    eager route is as fast for it, ``y.sum()``'s output gradient)."""
    return (t.layout == torch.strided and not t._is_zerotensor() and not t.is_neg()
            and t.untyped_storage().nbytes() >= (t.storage_offset() + t.numel()) * t.element_size())  # (a storage
    # resized to 0, as FSDP2 frees one: torch's ops raise, the kernels would read past it)


def forward(rows: Tensor, g: Tensor, v: Tensor, bias: Tensor | None, exp_scale: bool,
            batch_shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, u, safe, scale)``: ``y = u * scale + bias`` (``[*batch_shape, out]``, a tensor of its own:
    a view would forbid the caller's in-place ops on it) and ``u = rows @ v'`` (``[R, out]``), ``safe =
    ||v||`` per unit (1 for a zero direction) and ``scale = gain / safe`` (``[out]``).  ``rows`` contiguous."""
    lib = _load()[0]
    count, out = rows.shape[0], v.shape[0]
    cpu = rows.device  # (not torch's default device, which set_default_device may have moved)
    y = torch.empty(*batch_shape, out, dtype=torch.float32, device=cpu)
    u = torch.empty(count, out, dtype=torch.float32, device=cpu)
    safe, scale = torch.empty(out, dtype=torch.float32, device=cpu), torch.empty(out, dtype=torch.float32, device=cpu)
    lib.wn_forward_f32(rows.data_ptr(), v.data_ptr(), g.data_ptr(), bias.data_ptr() if bias is not None else None,
                       y.data_ptr(), u.data_ptr(), safe.data_ptr(), scale.data_ptr(), count, v.shape[1], out,
                       int(exp_scale), torch.get_num_threads())
    return y, u, safe, scale


def backward(grad_y: Tensor, rows: Tensor, u: Tensor, safe: Tensor, scale: Tensor, v: Tensor, *, exp_scale: bool,
             input_grad: bool, bias_grad: bool) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """The gradients of :func:`forward`'s ``y``: ``(grad_x [R, in] or None, grad_g [out], grad_v [out, in],
    grad_bias [out] or None)``, ``grad_v`` projected away from ``v``.  ``rows`` contiguous."""
    lib = _load()[0]
    grad_y = grad_y.contiguous()  # (a transposed one is not)
    grad_x = torch.empty_like(rows) if input_grad else None  # before grad_v: the heap keeps grad_v's block warm
    grad_g = torch.empty(v.shape[0], dtype=torch.float32, device=v.device)
    grad_bias = torch.empty(v.shape[0], dtype=torch.float32, device=v.device) if bias_grad else None
    grad_v = torch.empty_like(v, memory_format=torch.contiguous_format)
    lib.wn_backward_f32(grad_y.data_ptr(), rows.data_ptr(), u.data_ptr(), safe.data_ptr(), scale.data_ptr(),
                        v.data_ptr(), grad_v.data_ptr(), grad_x.data_ptr() if grad_x is not None else None,
                        grad_g.data_ptr(), grad_bias.data_ptr() if grad_bias is not None else None, rows.shape[0], v.shape[1],
                        v.shape[0], int(exp_scale), torch.get_num_threads(), int(v.numel() >= _STREAM_MIN_ELEMENTS))
    return grad_x, grad_g, grad_v, grad_bias


def _load() -> tuple[ctypes.CDLL | None, KernelStatus]:
    global _loaded
    if _loaded is None:
        warn = False
        with _lock:
            if _loaded is None:
                lib, status, warn = _build_and_load()
                _loaded = lib, status
        if warn:  # once, after the outcome is kept: a warning raised as an error (-W error) changes nothing
            warn_user(f"wn_transform: the native kernels are off ({_loaded[1].reason}); the layers compute the same "
                      "results on the eager route (WN_TRANSFORM_KERNELS=0 turns them off without this warning)",
                      RuntimeWarning)
    return _loaded


def _cache_dir() -> Path:
    """``$WN_TRANSFORM_CACHE``, else ``$XDG_CACHE_HOME/wn_transform`` or ``~/.cache/wn_transform``
    (an empty variable counts as unset), made absolute: the loader searches its own path for a bare name.
    Raises OSError where there is no home folder (a uid with no passwd entry and no ``$HOME``): a
    shared temporary folder would let another user plant the library."""
    if os.environ.get("WN_TRANSFORM_CACHE"):
        return Path(os.environ["WN_TRANSFORM_CACHE"]).absolute()
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError) as exc:
            msg = f"no home folder to keep the built kernels in ({exc}); set $WN_TRANSFORM_CACHE to a folder of yours"
            raise OSError(msg) from exc
    return (Path(base) / "wn_transform").absolute()


def _row_limit(vendor: str) -> int:
    """Up to how many rows per call the output form takes the kernels, on a CPU of ``vendor``.

    The backward updates ``grad_x`` once per row, so its cost grows with the rows, where the eager
    route's matmuls (MKL) cost about the same from 1 to 8 rows.  Measured, forward and backward of
    a 1024 x 1024 layer, 1 thread: on an Intel Xeon VM the kernels lose from 5 rows (8 rows: 2214
    against 1957 us, backward alone); on an AMD EPYC VM, where MKL's skinny matmuls are slow,
    they win at 8 rows by 2.5x (988 against 2515 us; 4 rows 440 against 2139).  Where the vendor
    is not known (no /proc/cpuinfo) or not measured, the rows proven everywhere: 4."""
    return MAX_ROWS if vendor == "AuthenticAMD" else _ROWS


def _cpu_vendor() -> str:
    """``vendor_id`` of /proc/cpuinfo (``GenuineIntel``, ``AuthenticAMD``, ...), or "" where unknown."""
    line = _cpuinfo_line("vendor_id")
    return line.partition(":")[2].strip() if line else ""


def _cpu_fingerprint() -> str:
    """The CPU's feature flags: a library built with -march=native runs only where they match."""
    return _cpuinfo_line("flags", "Features") or platform.processor()


def _cpuinfo_line(*keys: str) -> str | None:
    """The first line of /proc/cpuinfo that starts with one of ``keys``; None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line for line in f if line.startswith(keys)), None)
    except OSError:
        return None


_SWITCH_OFF, _SWITCH_ON = ("0", "false", "off", "no"), ("", "1", "true", "on", "yes")


def _build_and_load() -> tuple[ctypes.CDLL | None, KernelStatus, bool]:
    """The library and its status, and whether to warn of the status: a build or load that was
    tried and failed, or a switch value not understood (not an expected absence: switched off,
    another CPU, no compiler).  Never raises: the layers take the eager route whatever goes wrong."""
    switch = os.environ.get("WN_TRANSFORM_KERNELS", "1").strip().lower()
    if switch in _SWITCH_OFF:
        return None, KernelStatus(False, None, f"disabled by WN_TRANSFORM_KERNELS={os.environ['WN_TRANSFORM_KERNELS']}"), False
    if switch not in _SWITCH_ON:
        return None, KernelStatus(False, None, f"WN_TRANSFORM_KERNELS={os.environ['WN_TRANSFORM_KERNELS']!r} is none "
                                               "of 1/true/on/yes (use them) or 0/false/off/no (off): left off"), True
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, KernelStatus(False, None, f"the kernels are written for x86-64 (AVX2, FMA), this is {platform.machine()}"), False
    given = os.environ.get("CC", "cc")
    try:
        command = shlex.split(given) if given.strip() else ["cc"]  # (a $CC with arguments: "ccache gcc", "gcc -m64")
    except ValueError as exc:
        return None, KernelStatus(False, None, f"$CC={given!r} cannot be read as a command ({exc})"), True
    compiler = shutil.which(command[0])
    if compiler is None:
        return None, KernelStatus(False, None, f"no C compiler: {command[0]!r} (from $CC={given!r}) is not on PATH; a "
                                               "built library is kept per compiler, so one is needed (set $CC)"), False
    command = [compiler, *command[1:]]
    path = None
    try:
        version = _run([*command, "--version"], timeout=10).stdout
        source = _SOURCE.read_bytes()
        key = hashlib.sha256(b"\0".join(s.encode() if isinstance(s, str) else s for s in
                                        (source, " ".join(command), version, " ".join(_FLAGS), _cpu_fingerprint()))).hexdigest()[:16]
        path = _cache_dir() / f"kernels-{key}.so"
        _sweep_partials(path.parent)  # (on every first use: a library once built is not built again to sweep)
        if not _intact(path):  # never built, or damaged (cut short, written by a compiler that failed)
            error = _build_once(command, path)
            if error:
                return None, KernelStatus(False, None, error), True
        lib = ctypes.CDLL(str(path))
        matches = (getattr(lib, "wn_kernels_version", None) is not None and lib.wn_kernels_version() == _VERSION
                   and getattr(lib, "wn_kernels_max_rows", None) is not None and lib.wn_kernels_max_rows() == MAX_ROWS)
    except Exception as exc:  # (the user's compiler and file system: any failure leaves the eager route, said once)
        return None, KernelStatus(False, None if path is None else str(path),
                                  f"could not build or load the kernels: {type(exc).__name__}: {exc}"), True
    if not matches:
        return None, KernelStatus(False, str(path), f"{path} does not match this version of wn_transform"), True
    pointer, size, number = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.wn_forward_f32.argtypes = [pointer] * 8 + [size] * 3 + [number] * 2
    lib.wn_backward_f32.argtypes = [pointer] * 10 + [size] * 3 + [number] * 3
    lib.wn_calibrate_f32.argtypes = [pointer] * 7 + [size] * 4 + [ctypes.c_float] + [number] * 3
    lib.wn_calibrate_f32.restype = None
    return lib, KernelStatus(True, str(path), f"built from {_SOURCE.name} with {' '.join(command)}",
                             _row_limit(_cpu_vendor())), False


def _run(command: list[str], *, timeout: float) -> subprocess.CompletedProcess:
    """``command`` in a session of its own, its output in files (a helper it leaves running with
    them open cannot hold this call), every process of that session killed if it outlasts
    ``timeout`` or this call is interrupted (Ctrl-C: the session does not get the terminal's SIGINT)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, text=True,
                                   start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())


_ELF = b"\x7fELF"


def _intact(path: Path) -> bool:
    """Whether ``path`` is a library this process may load: its bytes hash to what its build wrote
    beside it (``<path>.sha256``), so a file cut short, emptied or replaced is built again rather
    than loaded (a library cut short kills the process that maps it)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest().encode() == _digest_file(path).read_bytes()
    except OSError:
        return False


def _whole_elf(content: bytes) -> bool:
    """Whether ``content`` is a 64-bit little-endian ELF file whose header tables and segments all
    lie within it (a file cut short does not)."""
    if not content.startswith(_ELF) or len(content) < 64 or content[4:6] != b"\x02\x01":
        return False
    phoff, shoff = struct.unpack_from("<QQ", content, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", content, 54)
    if phoff + phnum * phentsize > len(content) or shoff + shnum * shentsize > len(content):
        return False
    for index in range(phnum):
        offset, _, _, filesz = struct.unpack_from("<QQQQ", content, phoff + index * phentsize + 8)
        if offset + filesz > len(content):
            return False
    return True


def _digest_file(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def _sweep_partials(folder: Path) -> None:
    """Remove what builds killed outright (SIGKILL, a job's time limit) left in ``folder``: partials
    older than any build may run whose builder is gone (a shared cache's other hosts' ids mean
    nothing: their age does), and any a day old."""
    with contextlib.suppress(OSError):
        for stale in folder.glob("kernels-*.partial*"):
            with contextlib.suppress(OSError):
                age = time.time() - stale.stat().st_mtime
                if age > 86400 or (age > _STALE_AFTER and not _builder_alive(stale)):
                    stale.unlink()


def _builder_alive(partial: Path) -> bool:
    """Whether the process whose build ``partial`` is (its id in the name: ``kernels-KEY-PID-RAND``)
    still runs on this machine."""
    try:
        pid = int(partial.name.split(".")[0].split("-")[2])
    except (IndexError, ValueError):  # (another naming: an older version's; judged by its age alone)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's process)
        pass
    return True


def _build_once(command: list[str], path: Path) -> str | None:
    """:func:`_compile`, one process at a time per library (a lock file beside it, where the file
    system has ``flock``; without it, each builds, and the renames keep the library whole): the
    others, which waited, find it built (and its hash with it) and load it, or find the failure the
    builder left (``<lib>.failed``, heeded for ten minutes) and do not try again at once.  A wait
    beyond a build's time limit (a builder stopped with Ctrl-Z) gives up, with the reason."""
    path.parent.mkdir(parents=True, exist_ok=True)
    failed = path.with_name(f"{path.name}.failed")
    try:
        lock = os.open(path.with_name(f"{path.name}.lock"), os.O_RDONLY | os.O_CREAT, 0o666)  # (another user's too)
    except OSError:
        lock = None
    try:
        held = lock is not None and fcntl is not None and _acquire(lock)
        if held is None:
            return (f"another process has been building the kernels into {path.parent} for over "
                    f"{_LOCK_WAIT} s (a build stopped with Ctrl-Z?)")
        if _intact(path):
            return None
        if held:
            with contextlib.suppress(OSError, ValueError):
                if (age := time.time() - failed.stat().st_mtime) < _FAILURE_MEMORY:
                    return f"a build failed {age:.0f} s ago ({failed}; delete it to try again now): {failed.read_text()}"
        error = _compile(command, path)
        if error and held:
            with contextlib.suppress(OSError):
                failed.write_text(error)
        elif not error:
            with contextlib.suppress(FileNotFoundError):
                failed.unlink()
        return error
    finally:
        if lock is not None:
            os.close(lock)  # (releases the lock)


def _acquire(lock: int) -> bool | None:
    """Lock ``lock`` exclusively, waiting up to ``_LOCK_WAIT``; True, False where the file
    system has no ``flock`` (Lustre without it: ENOSYS), None where the wait ran out."""
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        except OSError:
            return False


def _compile(command: list[str], path: Path) -> str | None:
    """Compile ``kernels.c`` to ``path`` (atomically: a concurrent process sees all of it or none;
    the compiler creates its output, with the modes the umask gives), its hash beside it
    (:func:`_intact`), written first.  Returns None, or what went wrong."""
    partial = path.with_name(f"{path.stem}-{os.getpid()}-{uuid.uuid4().hex[:8]}.so.partial")
    written = path.with_name(f"{partial.name}.sha256")
    shown = " ".join(command)
    try:
        try:
            done = _run([*command, *_FLAGS, str(_SOURCE), "-o", str(partial), "-lm"], timeout=_COMPILE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return f"{shown} did not finish compiling {_SOURCE} within {_COMPILE_TIMEOUT} s (killed)"
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            telling = [line for line in lines if any(word in line for word in ("error", "failed", "No space"))]
            said = "; ".join((telling or lines)[-2:]) or f"exit status {done.returncode}"
            return f"{shown} could not compile {_SOURCE}: {said}"
        content = partial.read_bytes() if partial.exists() else b""
        if not _whole_elf(content):  # (one cut short kills the process that maps it)
            return f"{shown} reported success but wrote no whole shared library ({len(content)} bytes)"
        loads = None
        if not getattr(sys, "frozen", False) and Path(sys.executable).name.startswith("python"):  # (not an app
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # embedding Python: uWSGI, Blender)
                loads = _run([sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(sys.argv[1])", str(partial)],
                             timeout=60)  # loaded in another process first, where one can be started
        if loads is not None and loads.returncode != 0:
            said = (loads.stderr.strip().splitlines() or [f"exit status {loads.returncode}"])[-1]
            return f"{shown} reported success but its library does not load ({said})"
        with open(os.open(written, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as file:  # (the umask's mode)
            file.write(hashlib.sha256(content).hexdigest())
        os.replace(written, _digest_file(path))
        os.replace(partial, path)
        return None
    finally:
        for left in (partial, written):
            with contextlib.suppress(FileNotFoundError):
                left.unlink()
