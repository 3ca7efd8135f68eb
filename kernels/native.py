"""Fused CPU kernels for bf16 decoding (``native.c``), built here for this machine's CPU.

A batch-1 SmolLM2 step in bf16 spent about 6 of its 21 ms in ~1700 small torch ops around
the matrix products (norms, RoPE, the KV write, attention's gathers, SiLU): a few microseconds
of dispatch each. ``native.c`` does each layer's glue in four calls:

- ``add_rmsnorm``: the residual add fused with the next RMSNorm;
- ``rope_kv``: RoPE on q and k in place, then k and v written to their KV slots;
- ``decode_attention``: paged decode attention reading each page in place, once;
- ``prefill_attention``: causal prefill attention over the pages in place (flash-style: blocks
  of 64 keys, AVX-512 BF16 dot products, an online softmax; 6.9 against SDPA's 11.7 ms a
  SmolLM2 layer for a 1000-token prompt);
- ``silu_mul``: SiLU(gate) * up;

and besides: ``lora`` (a projection group's LoRA terms from bf16 copies of the float32 slots,
B transposed), ``gemv`` and ``gemv_int8`` (bf16 / int8 weights, a few rows, one sequential
stream per thread; the int8 one in integers on x quantized to int16) and ``decode_layers``
(every layer of a small decode step, LoRA terms included, in one call and one thread team).

Each rounds as the torch ops it replaces (bf16 after every op torch does in bf16), so outputs
match the torch path to a bf16 rounding step here and there (reduction order): the tests
compare every kernel with its torch version on random inputs.

Building: an engine on CPU compiles ``native.c`` when it starts (never inside a step) with the
C compiler (``$CC``, else ``cc``/``gcc``/``clang``) for this CPU (``-march=native``, on Arm
``-mcpu=native``: the machine is probed by its own compiler, never assumed;
``GPUPOOL_NATIVE_MARCH`` names another target, see :func:`target`), linked to torch's own
OpenMP runtime where torch ships one (one thread team, as torch's ops; elsewhere, e.g. macOS,
one thread), into ``$GPUPOOL_NATIVE_DIR`` (default ``~/.cache/gpupool/native``), keyed by a
hash of the source, the compiler's version, the flags and the CPU's flags; later processes
load it in milliseconds. Then each kernel is checked once against torch on small random
inputs. Which kernels a build has follows its target: the portable C ones everywhere, the bf16
GEMV and the prefill (and decode) attention with AVX2 + FMA or AVX-512 BF16 (bit-identical),
the int8 GEMV with AVX-512 BW or AVX2 + FMA (the same integer sums) (``gp_gemv_features``).
Without a compiler, or if the build or the check fails, :func:`available` is False (a WARNING
naming the compiler's first error) and the model keeps its torch path. ``GPUPOOL_NATIVE=0``
(the engine's ``native`` setting) keeps a model off them.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
HEADER = Path(__file__).with_name("native.h")  # the structs that cross, written once there
MAX_DIM = 16384  # as native.c
MAX_HEAD_DIM = 256
MAX_GROUP = 16
MAX_LORA_RANK = 256  # as native.c (MAX_LORA_COLS: 3 projections x 256)
_LOCK = threading.Lock()
# "lib": the loaded library or None; "features": its gp_gemv_features() bits, read once.
# Facts about this process's build, not choices: whether a model uses the kernels is its
# backend's choice (kernels.backend.select), made from the engine's config.
_STATE: dict[str, object] = {}

_i64, _int, _f32, _vp = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "gp_add_rmsnorm": [_vp, _i64, _vp, _i64, _vp, _int, _vp, _i64, _i64, _i64, _f32, _int],
    "gp_head_norms": [_vp, _i64, _i64, _i64, _i64, _i64, _vp, _int, _f32, _int],
    "gp_gelu_tanh_mul": [_vp, _i64, _vp, _i64, _i64, _i64, _int],
    "gp_silu_mul": [_vp, _i64, _vp, _i64, _i64, _i64, _int],
    "gp_rope_kv": [_vp, _i64, _i64, _i64, _i64, _i64, _vp, _vp, _vp, _vp, _i64, _vp, _vp, _int],
    "gp_decode_attention": [_vp, _i64, _i64, _i64, _i64, _i64, _vp, _vp, _i64, _i64, _vp, _i64,
                            _vp, _f32, _vp, _i64, _vp, _f32, _int],
    "gp_gemv_bf16": [_vp, _i64, _i64, _i64, _vp, _i64, _i64, _vp, _vp, _i64, _int],
    "gp_lora": [_vp, _i64, _i64, _vp, _i64, _vp, _i64, _i64, _int],
    "gp_lora_half": [_vp, _i64, _i64, _vp, _i64, _vp, _i64, _vp, _i64, _i64, _i64, _int],
    "gp_decode_layers": [_vp, _int],  # (const gp_step_t *, threads)
    "gp_gemv_int8": [_vp, _i64, _i64, _i64, _vp, _i64, _i64, _vp, _vp, _vp, _i64, _int],
    "gp_gemv_int4": [_vp, _i64, _i64, _i64, _vp, _i64, _i64, _vp, _int, _vp, _i64, _vp, _vp,
                     _vp, _i64, _int],
    "gp_moe_experts": [_vp, _i64, _i64, _i64, _vp, _vp, _i64, _i64, _vp, _vp, _vp, _vp, _i64,
                       _int, _vp, _vp, _int, _f32, _f32, _i64, _vp, _i64, _vp, _vp, _vp, _vp,
                       _i64, _vp, _int],
    "gp_swiglu_oai": [_vp, _i64, _vp, _i64, _i64, _i64, _f32, _f32, _int],
    "gp_argmax_rows": [_vp, _i64, _i64, _i64, _vp],
    "gp_finite_rows": [_vp, _i64, _i64, _i64, _vp],
    "gp_pack_pieces": [_vp, _i64, _vp, _i64, _f32, _vp, _i64, _i64, _i64, _i64, _i64, _i64],
    "gp_prefill_attention": [_vp, _i64, _i64, _vp, _vp, _i64, _i64, _i64, _vp, _vp, _i64, _i64,
                             _vp, _i64, _f32, _vp, _i64, _i64, _vp, _f32, _int],
}


_CTYPES = {"int64_t": ctypes.c_int64, "int32_t": ctypes.c_int32, "float": ctypes.c_float}


class _Struct(ctypes.Structure):
    """A native.h struct: its constructor refuses a field the struct does not have (plain
    ctypes would keep it as a Python attribute, and C would read a zero)."""

    def __init__(self, **fields):
        unknown = set(fields) - {name for name, _ in self._fields_}
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        super().__init__(**fields)


def _structs(text: str) -> tuple[int, dict[str, type]]:
    """(GP_ABI_VERSION, ctypes.Structure per typedef) read from native.h's text: its layouts
    are written there only. A field: ``type name;`` or ``type name[N];`` (a pointer is a
    c_void_p; a struct type is one typedef'd above)."""
    version = int(re.search(r"#define GP_ABI_VERSION (\d+)", text).group(1))
    structs: dict[str, type] = {}
    for body, name in re.findall(r"typedef struct \{(.*?)\} (\w+);", text, re.S):
        fields = []
        body = re.sub(r"\bconst\b", " ", re.sub(r"/\*.*?\*/", "", body, flags=re.S))
        for line in filter(str.strip, body.split(";")):
            m = re.fullmatch(r"\s*(\w+)\s*((?:\*\s*)*)(\w+)\s*(?:\[(\d+)\])?\s*", line)
            if m is None:
                raise RuntimeError(f"native.h: cannot read the field {line.strip()!r}")
            base, pointer, field, count = m.groups()
            ctype = ctypes.c_void_p if pointer else _CTYPES.get(base) or structs[base]
            fields.append((field, ctype * int(count) if count else ctype))
        structs[name] = type(name, (_Struct,), {"_fields_": fields})
    return version, structs


# an install without the header (a copy of the .py files only) imports, with the kernels
# unavailable: build() refuses, and the model takes the torch backend
ABI_VERSION, STRUCTS = _structs(HEADER.read_text()) if HEADER.exists() else (0, {})
Layer, LoraGroup, Lora, KV, Step, Tp = (STRUCTS.get(n) for n in (
    "gp_layer_t", "gp_lora_group_t", "gp_lora_t", "gp_kv_t", "gp_step_t", "gp_tp_t"))


def check(name: str, t: torch.Tensor, dtype: torch.dtype, dims: int,
          unit_stride: bool = True, contiguous: bool = False) -> None:
    """Raise ValueError unless ``t`` is a CPU tensor of ``dtype`` with ``dims`` dimensions,
    unit stride in its last one (or contiguous): checked before its address crosses into C,
    where a mismatch would corrupt memory silently. (About half a microsecond: the per-op
    path makes ~600 a SmolLM2 step.)"""
    if t.dtype != dtype or t.dim() != dims or not t.is_cpu:
        raise ValueError(f"native: {name} must be a {dims}-d CPU tensor of {dtype}, not "
                         f"{t.dim()}-d {t.dtype} on {t.device}")
    if contiguous:
        if not t.is_contiguous():
            raise ValueError(f"native: {name} must have contiguous memory")
    elif unit_stride and t.stride(-1) != 1 and t.numel():
        raise ValueError(f"native: {name} must have unit stride in its last dimension")


def cache_dir() -> Path:
    return Path(os.environ.get("GPUPOOL_NATIVE_DIR", "~/.cache/gpupool/native")).expanduser()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _torch_gomp() -> Path | None:
    """torch's bundled OpenMP runtime (linking to it keeps one thread team per thread)."""
    lib = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    return lib if lib.exists() else None


# Compiled with -ffast-math (vectorised reductions and exp), linked without it: linking with
# -ffast-math adds crtfastmath.o, whose constructor turns on flush-to-zero and
# denormals-are-zero for the whole process when the library loads (subnormal floats become 0
# in every torch op and in Python: hypothesis caught it). The kernels' arithmetic never
# relies on infinities or NaN (NaN bits are kept by integer ops). The bf16 GEMV's order is
# fixed in the source (its sums behind empty asm statements): -ffast-math cannot move it.
# Divisions stay divisions (recip_flag): with -ffast-math both compilers otherwise turn a
# vectorised one into a reciprocal estimate and a Newton step, whose bits differ between
# the AVX2 build (rcpps) and the AVX-512 one (rcp14ps), e.g. SiLU's.
COMPILE_FLAGS = ["-O3", "-ffast-math", "-fPIC", "-std=gnu11"]


@functools.cache
def recip_flag(cc: str) -> str:
    """The flag that keeps ``cc`` from estimating reciprocals: Clang's spelling, or GCC's."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    return "-mrecip=none" if "clang" in version.lower() else "-mno-recip"


def target() -> str:
    """The CPU the kernels are built for: ``native`` (this machine's own, as its compiler
    probes it) unless ``GPUPOOL_NATIVE_MARCH`` names another ``-march`` target, e.g.
    ``x86-64-v3`` for the AVX2 build on an AVX-512 machine (what a CPU without AVX-512 runs:
    the bf16 GEMV bit-identical, the AVX-512-only kernels left to torch)."""
    return os.environ.get("GPUPOOL_NATIVE_MARCH", "").strip() or "native"


def _arch_flag(march: str | None = None) -> str:
    """``-march=`` on x86; on Arm the compilers spell the host CPU ``-mcpu=native``."""
    march = march or target()
    if march == "native" and platform.machine().lower() in ("arm64", "aarch64"):
        return "-mcpu=native"
    return f"-march={march}"


def _flags(march: str | None = None) -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for ``march`` (default: :func:`target`)."""
    compile_flags, link = [*COMPILE_FLAGS, _arch_flag(march)], ["-shared"]
    cc = _compiler()
    if cc is not None and platform.machine().lower() in ("x86_64", "amd64"):
        compile_flags.append(recip_flag(cc))
    gomp = _torch_gomp()
    if gomp is not None:
        compile_flags.append("-fopenmp")
        link += ["-fopenmp", f"-L{gomp.parent}", f"-Wl,-rpath,{gomp.parent}"]
    return compile_flags, link


def first_error(stderr: str) -> str:
    """The compiler's first error line (else its first line): what a failed build says."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[0][:300]


class BuildError(RuntimeError):
    """The compiler or the linker failed (its first error in the message)."""


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise BuildError(f"{cmd[0]} failed: {first_error(proc.stderr)}")


def _cpu_id() -> str:
    """The CPU's model and flags (``-march=native`` builds for exactly this CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))


def build(march: str | None = None) -> Path:
    """The library compiled for ``march`` (default: :func:`target`), built if missing.
    Raises BuildError (the compiler's first error) or RuntimeError (no compiler)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) on PATH")
    if not (SOURCE.exists() and HEADER.exists()):
        raise RuntimeError(f"{SOURCE.name} or {HEADER.name} is missing from {SOURCE.parent}")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([
        SOURCE.read_text(), HEADER.read_text(), version, repr(_flags(march)), _cpu_id(),
    ]).encode()).hexdigest()[:16]
    out = cache_dir() / f"gpupool_native_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    obj = tmp[:-3] + ".o"
    compile_flags, link = _flags(march)
    try:
        _run([cc, *compile_flags, "-c", str(SOURCE), "-o", obj])
        _run([cc, *link, obj, "-o", tmp, "-lm"])  # no -ffast-math here (see COMPILE_FLAGS)
        os.replace(tmp, out)  # atomic: other processes see the whole file or none
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)
    return out


def open_library(path: Path):
    """A built library loaded, its functions' argument types set; RuntimeError if it was
    built from another native.h (its gp_abi_version())."""
    lib = ctypes.CDLL(str(path))
    lib.gp_abi_version.restype = ctypes.c_int
    if lib.gp_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path.name}: ABI version {lib.gp_abi_version()}, native.h says "
                           f"{ABI_VERSION}")
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, None
    lib.gp_gemv_features.restype = ctypes.c_int
    lib.gp_decode_layers.restype = ctypes.c_int
    lib.gp_prefill_attention.restype = ctypes.c_int
    lib.gp_moe_experts.restype = ctypes.c_int
    lib.gp_pack_pieces.restype = ctypes.c_int64
    return lib


def available() -> bool:
    """Whether the kernels are built, loaded and checked (once per process)."""
    if "lib" not in _STATE:
        with _LOCK:
            if "lib" not in _STATE:
                _STATE["lib"] = _probe()
    return _STATE["lib"] is not None


def loaded() -> bool:
    """Whether the kernels are built, loaded and checked already (never builds them)."""
    return _STATE.get("lib") is not None


def _probe():
    try:
        lib = open_library(build())
        _STATE["features"] = lib.gp_gemv_features()  # fixed by the build
        _STATE["lib"] = lib  # the checks call the kernels through the wrappers below
        failed = failures()
    except BuildError as e:
        logger.warning("native CPU kernels failed to build for %s (%s); using torch ops",
                       _arch_flag(), e)
        return None
    except (RuntimeError, OSError, AttributeError) as e:
        logger.warning("native CPU kernels unavailable (%s); using torch ops", e)
        return None
    if failed:
        logger.warning("native CPU kernels disagree with torch (%s); using torch ops",
                       ", ".join(failed))
        return None
    return lib


def _lib():
    lib = _STATE.get("lib")
    if lib is None and available():  # a kernel called before anything built them
        lib = _STATE["lib"]
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available here")
    return lib


def _has(feature: int) -> bool:
    """Whether the kernels are available and this build has ``feature`` (a
    gp_gemv_features bit)."""
    return available() and bool(_STATE["features"] & feature)


def _p(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def supports(device: torch.device, dtype: torch.dtype, hidden: int, inter: int, heads: int,
             kv_heads: int, head_dim: int) -> bool:
    """Whether a model of these sizes can run on the kernels with activations of ``dtype``
    on ``device``."""
    return (device.type == "cpu" and dtype == torch.bfloat16
            and max(hidden, inter) <= MAX_DIM and head_dim <= MAX_HEAD_DIM
            and heads % kv_heads == 0 and heads // kv_heads <= MAX_GROUP
            and head_dim % 2 == 0)


def has_gemv() -> bool:
    """Whether the bf16 GEMV was built: the compiler targets AVX-512 BF16, or AVX2 with FMA
    (the same sums, bit for bit; see native.c's gemv_rows)."""
    return _has(1)


def gemv_isa() -> str | None:
    """Which build of the bf16 GEMV runs: ``avx512_bf16``, ``avx2`` or None (none built)."""
    if not has_gemv():
        return None
    return "avx2" if _STATE["features"] & 8 else "avx512_bf16"


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.linear(x, weight, bias)`` for bf16 rows, each row's sums in one order whatever the
    number of rows (where :func:`has_gemv`). x: [rows, K] with unit stride in a row; weight:
    [N, K] likewise."""
    check("x", x, torch.bfloat16, 2)
    check("weight", weight, torch.bfloat16, 2)
    if weight.shape[1] != x.shape[1] or (bias is not None and bias.shape != weight.shape[:1]):
        raise ValueError("native: gemv's x, weight and bias do not fit")
    rows, k = x.shape
    n = weight.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype)
    _lib().gp_gemv_bf16(x.data_ptr(), rows, k, x.stride(0), weight.data_ptr(), n,
                        weight.stride(0), _p(bias), out.data_ptr(), n, torch.get_num_threads())
    return out


class MoeTable(NamedTuple):
    """A mixture-of-experts layer's expert weights for :func:`moe_experts`: their addresses
    (int64 [2 E]: gate_up's then down's, 0 where absent), hidden and intermediate sizes; for
    4-bit experts their group scales' and offsets' addresses (likewise), the group size and
    their one codebook (or None); for int8 experts their row scales' addresses and group -1
    (0: bf16); the products' biases' addresses (likewise, 0 where none), or None."""
    addresses: torch.Tensor
    hidden: int
    inter: int
    scales: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    group: int = 0
    code: torch.Tensor | None = None
    biases: torch.Tensor | None = None
    e8: bool = False  # 4-bit scales as MXFP4's exponent bytes


def moe_table(gate_up: list[torch.Tensor | None], down: list[torch.Tensor | None],
              scales: list | None = None, offsets: list | None = None,
              codes: list | None = None, biases: list | None = None) -> MoeTable:
    """Expert e's ``gate_up[e]`` [2 inter, H] and ``down[e]`` [H, inter] bf16 (None: absent);
    or 4-bit (kernels/quant4.py: uint8 [N, K / 2]) with ``scales`` and ``offsets`` ([N, K / G],
    gate_up's E then down's E: float32, or the scales MXFP4's exponent bytes, uint8; offsets
    None: zero, every expert's or none) and ``codes`` (each one's codebook, float32 [16], or
    None: one for all or none); ``biases``: each product's bf16 bias [N] or None (gate_up's
    E then down's E), or None for none; or int8 [N, K] with ``scales`` only (bf16 [N],
    where :func:`has_gemv_int8`). Checked once (a layer's table is kept while its weights stay
    where they are)."""
    if len(gate_up) != len(down):
        raise ValueError("native: moe_table's gate_up and down lists differ in length")
    four = scales is not None and offsets is not None
    eight = scales is not None and offsets is None
    e8 = four and next((sc.dtype == torch.uint8 for sc in scales if sc is not None), False)
    if eight and not has_gemv_int8():
        raise ValueError("native: this build has no int8 product")
    dtype = torch.uint8 if four else torch.int8 if eight else torch.bfloat16
    present = [g is not None and d is not None for g, d in zip(gate_up, down)]
    shape, group = None, 0
    for e, (g, d) in enumerate(zip(gate_up, down)):
        if not present[e]:
            continue
        check("gate_up", g, dtype, 2, contiguous=True)
        check("down", d, dtype, 2, contiguous=True)
        unpacked = (d.shape[0], d.shape[1] * 2 if four else d.shape[1])  # [H, inter]
        shape = shape or unpacked
        if tuple(g.shape) != (2 * shape[1], shape[0] // 2 if four else shape[0]) or \
                unpacked != shape:
            raise ValueError("native: moe_table's expert weights do not fit")
        parts = ((g, shape[0], scales[e] if scales else None, offsets[e] if four else None),
                 (d, shape[1], scales[len(gate_up) + e] if scales else None,
                  offsets[len(gate_up) + e] if four else None))
        for w, k, sc, of in parts:
            if eight:
                check("scales", sc, torch.bfloat16, 1, contiguous=True)
                if sc.shape[0] != w.shape[0]:
                    raise ValueError("native: moe_table's int8 row scales do not fit")
            elif four:
                check("scales", sc, torch.uint8 if e8 else torch.float32, 2, contiguous=True)
                if of is not None:  # (None: zero, a codebook weight's)
                    check("offsets", of, torch.float32, 2, contiguous=True)
                gsz = k // sc.shape[1] if sc.shape[1] else 0
                group = group or gsz
                if ((of is not None and sc.shape != of.shape) or sc.shape[0] != w.shape[0]
                        or gsz != group
                        or group % 32 or k % group):
                    raise ValueError("native: moe_table's 4-bit groups do not fit")
    if shape is None or max(shape) > MAX_DIM:
        raise ValueError(f"native: moe_table needs expert weights of at most {MAX_DIM} columns")

    def addresses(ws):  # gate_up's E then down's E; 0 where absent
        return None if ws is None else torch.tensor(
            [w.data_ptr() if ok else 0 for w, ok in zip(ws, present + present)],
            dtype=torch.int64)

    code = _one_code(codes or [], present + present)
    if four and any(o is None for o, ok in zip(offsets, present + present) if ok):
        if any(o is not None for o, ok in zip(offsets, present + present) if ok):
            raise ValueError("native: moe_table's experts have offsets and none")
        offsets = None  # none has offsets: NULL
    if biases is not None:
        for b, w in zip(biases, gate_up + down):
            if b is not None and w is not None:
                check("bias", b, torch.bfloat16, 1, contiguous=True)
                if b.shape[0] != w.shape[0]:
                    raise ValueError("native: moe_table's biases do not fit")
        bias_addresses = torch.tensor([b.data_ptr() if b is not None and ok else 0
                                       for b, ok in zip(biases, present + present)],
                                      dtype=torch.int64)
    return MoeTable(addresses(gate_up + down), *shape, addresses(scales), addresses(offsets),
                    -1 if eight else group, code,
                    None if biases is None else bias_addresses, e8)


def _one_code(codes: list, present: list[bool]) -> torch.Tensor | None:
    """The experts' one codebook (None: none has one); ValueError where they differ."""
    held = [c for c, ok in zip(codes, present) if ok]
    if not held or all(c is None for c in held):
        return None
    first = held[0]
    if first is not None:
        check("code", first, torch.float32, 1, contiguous=True)
    if first is None or first.shape != (16,) or any(
            c is None or not torch.equal(c, first) for c in held):
        raise ValueError("native: moe_table's experts have different codebooks")
    return first


def moe_lora(table, groups: list) -> tuple:
    """:func:`moe_experts`' LoRA terms: the step's ``table`` (:func:`lora_table`: its segments
    are the rows') and per expert group (gate_up's, down's) None, or (A offset, BT offset in
    bytes of the pieces' bf16 part, the fan-in K and the one width of every expert's
    projection, ranks int32 [E, S]): expert e's A rows at A offset + e K elements, its BT
    columns from e width. Made once a step: the layer is :func:`moe_experts`' argument."""
    made = (LoraGroup * 2)()
    for g, group in enumerate(groups):
        if group is None:
            continue
        a_off, bt_off, _, width, ranks = group
        check("proj_rank", ranks, torch.int32, 2, contiguous=True)
        if ranks.shape[1] != table.num_segments or int(ranks.max()) > MAX_LORA_RANK:
            raise ValueError(f"native: expert ranks must be [E, {table.num_segments}]")
        made[g] = LoraGroup(a_offset=a_off, bt_offset=bt_off, num_proj=ranks.shape[0],
                            widths=(ctypes.c_int64 * 3)(width, 0, 0),
                            proj_rank=ranks.data_ptr())
    return table, made, groups


def moe_experts(h: torch.Tensor, idx: torch.Tensor, top: torch.Tensor, table: MoeTable,
                swiglu: tuple[float, float] | None = None, lora: tuple | None = None,
                layer: int = 0) -> torch.Tensor:
    """A mixture-of-experts MLP's output for bf16 rows ``h`` [T, H] in one call (where
    :func:`has_gemv`): row t's experts ``idx[t]`` (int64 [T, k]), weighted by ``top[t]`` (bf16),
    added in float32 in ascending expert order and rounded once, the experts' weights in
    ``table`` (:func:`moe_table`). The bits of LlamaModel._experts' loop of :func:`gemv` and
    :func:`silu_mul` per expert (``swiglu`` (limit, alpha): :func:`swiglu_oai`'s, gpt-oss;
    NaN bit patterns aside), whatever shares the call. ``lora`` (:func:`moe_lora`'s): each
    pair's adapter's expert terms at ``layer`` added after its gate_up and its down product,
    as :func:`lora` adds a projection's (row by row)."""
    check("h", h, torch.bfloat16, 2)
    check("idx", idx, torch.int64, 2, contiguous=True)
    check("top", top, torch.bfloat16, 2, contiguous=True)
    rows, hidden = h.shape
    k, experts, inter = idx.shape[1], table.addresses.shape[0] // 2, table.inter
    if idx.shape[0] != rows or top.shape != idx.shape or hidden != table.hidden:
        raise ValueError("native: moe_experts' rows, choices and experts do not fit")
    pairs, group = rows * k, table.group
    scratch = torch.empty(pairs * (2 * hidden + 3 * inter), dtype=torch.bfloat16)
    if group > 0:  # the 4-bit products' prepared x (native.c), in floats
        q4 = torch.empty(pairs * ((hidden + 63) // 64 * 32 + hidden // group
                                  + (inter + 63) // 64 * 32 + inter // group) + 16,
                         dtype=torch.float32)
    elif group < 0:  # the int8 products': int16 rows (32-column multiples) and a scale each
        q4 = torch.empty(pairs * ((hidden + 31) // 32 * 16 + 1 + (inter + 31) // 32 * 16 + 1)
                         + 16, dtype=torch.float32)
    else:
        q4 = None
    order = torch.empty(pairs + 2 * experts + 2 + rows, dtype=torch.int64)
    if lora is not None:
        _check_layer(lora[0], layer, 0)
        for part, sizes in zip(lora[2], ((hidden, 2 * inter), (inter, hidden))):
            if part is not None and (part[2:4] != sizes or part[4].shape[0] != experts):
                raise ValueError("native: moe_experts' LoRA names other experts or sizes")
        if int(lora[0]._keep[0][-1]) != rows:  # the segments' starts [S + 1]
            raise ValueError("native: moe_experts' LoRA segments do not cover its rows")
    out = torch.empty(rows, hidden, dtype=h.dtype)
    addr = table.addresses.data_ptr()
    if _lib().gp_moe_experts(h.data_ptr(), h.stride(0), rows, hidden, idx.data_ptr(),
                             top.data_ptr(), k, experts, addr, addr + 8 * experts,
                             _p(table.scales), _p(table.offsets), group, int(table.e8),
                             _p(table.code), _p(table.biases), int(swiglu is not None),
                             *(swiglu or (0.0, 0.0)), inter,
                             out.data_ptr(), hidden, scratch.data_ptr(), _p(q4),
                             order.data_ptr(),
                             None if lora is None else ctypes.addressof(lora[0]), layer,
                             None if lora is None else ctypes.addressof(lora[1]),
                             torch.get_num_threads()):
        raise ValueError("native: moe_experts chose an expert out of range or without weights")
    return out


def has_gemv_int8() -> bool:
    """Whether the int8 GEMV was built (AVX-512 BW or AVX2 + FMA: the same bits)."""
    return _has(2)


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear_int8(x, q, scale, bias)`` for bf16 rows (exact integer sums: a row's result
    whatever the number of rows): int8 ``q`` [N, K] with unit stride in a row, bf16
    ``scale`` [N] (where :func:`has_gemv_int8`)."""
    check("x", x, torch.bfloat16, 2)
    check("q", q, torch.int8, 2)
    check("scale", scale, torch.bfloat16, 1, contiguous=True)
    if q.shape[1] != x.shape[1] or scale.shape != q.shape[:1]:
        raise ValueError("native: gemv_int8's x, q and scale do not fit")
    rows, k = x.shape
    n = q.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype)
    _lib().gp_gemv_int8(x.data_ptr(), rows, k, x.stride(0), q.data_ptr(), n, q.stride(0),
                        scale.data_ptr(), _p(bias), out.data_ptr(), n, torch.get_num_threads())
    return out


def has_gemv_int4() -> bool:
    """Whether the 4-bit product was built (the bf16 GEMV's builds: AVX-512F or AVX2 + FMA,
    bit-identical)."""
    return _has(16)


def gemv_int4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
              offset: torch.Tensor | None, bias: torch.Tensor | None = None,
              code: torch.Tensor | None = None) -> torch.Tensor:
    """``quant4.linear_int4_reference(x, q, scale, offset, bias, code=code)`` for bf16 rows,
    each row's sums in one order whatever the number of rows (where :func:`has_gemv_int4`):
    packed ``q`` uint8 [N, K / 2] with unit stride in a row, ``scale`` and ``offset``
    [N, K / G] contiguous (G a multiple of 32): float32 (the scales may be MXFP4's exponent
    bytes, uint8; ``offset`` None: zero), ``code`` float32 [16] (a codebook) or None."""
    check("x", x, torch.bfloat16, 2)
    e8 = scale.dtype == torch.uint8  # MXFP4's exponent bytes (quant4.scale_values)
    if code is not None:
        check("code", code, torch.float32, 1, contiguous=True)
        if code.shape != (16,):
            raise ValueError("native: gemv_int4's codebook must hold 16 values")
    check("q", q, torch.uint8, 2)
    check("scale", scale, torch.uint8 if e8 else torch.float32, 2, contiguous=True)
    if offset is not None:
        check("offset", offset, torch.float32, 2, contiguous=True)
    rows, k = x.shape
    n = q.shape[0]
    groups = scale.shape[1]
    if (q.shape[1] * 2 != k or k % 32 or groups == 0 or k % groups or (k // groups) % 32
            or scale.shape != (n, groups)
            or (offset is not None and offset.shape != scale.shape)
            or (bias is not None and bias.shape != (n,))):
        raise ValueError("native: gemv_int4's x, q, scale, offset and bias do not fit")
    out = torch.empty(rows, n, dtype=x.dtype)
    if rows == 0:
        return out
    _lib().gp_gemv_int4(x.data_ptr(), rows, k, x.stride(0), q.data_ptr(), n, q.stride(0),
                        scale.data_ptr(), int(e8), _p(offset), k // groups, _p(code),
                        _p(bias), out.data_ptr(), n, torch.get_num_threads())
    return out


def takes_rows(x: torch.Tensor) -> bool:
    """Whether :func:`argmax` and :func:`finite_rows` run on ``x``: float32 rows [R, V] on CPU
    with unit stride in a row, the kernels loaded (an engine loads them when it starts; these
    two are exact, so whichever runs gives the same answer)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and x.stride(-1) == 1 and loaded())


def argmax(x: torch.Tensor) -> list[int]:
    """``x.argmax(-1).tolist()`` for rows ``x`` that hold no NaN (where :func:`takes_rows`)."""
    check("logits", x, torch.float32, 2)
    rows, v = x.shape
    out = (ctypes.c_int64 * rows)()
    _lib().gp_argmax_rows(x.data_ptr(), rows, v, x.stride(0), out)
    return list(out)


def finite_rows(x: torch.Tensor) -> list[bool]:
    """``torch.isfinite(x).all(-1).tolist()`` (where :func:`takes_rows`)."""
    check("logits", x, torch.float32, 2)
    rows, v = x.shape
    ok = (ctypes.c_int8 * rows)()
    _lib().gp_finite_rows(x.data_ptr(), rows, v, x.stride(0), ok)
    return [bool(b) for b in ok]


_PACK_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def pack_pieces(values: torch.Tensor, runs: torch.Tensor, scaling: float,
                pieces: torch.Tensor | None, piece_bytes: int, elems: int,
                mirror_offset: int | None, covers: bool) -> int:
    """Write an adapter's float32 pieces from its file's ``values`` (1-d float32, float16 or
    bfloat16) by ``runs`` (int64 [R, 5]: dst, src, n, stride, scaled; adapters/paged.py
    PackPlan), their bf16 copies at ``mirror_offset`` (None: none), zeros where no run
    writes (``covers``: the runs write every one of a piece's ``elems`` values); each
    piece's address in ``pieces`` (int64 [n]: a host buffer's rows or places in KV pages;
    None: only count), on the calling thread's torch threads where it writes (the runs write
    apart). The number of values that are not finite. The caller checks that
    the runs stay inside ``values`` and the pieces, and that each piece has piece_bytes."""
    if (values.dtype not in _PACK_KINDS or values.dim() != 1 or not values.is_contiguous()
            or not values.is_cpu):
        raise ValueError("values must be a contiguous 1-d float32, float16 or bfloat16 tensor")
    check("runs", runs, torch.int64, 2, contiguous=True)
    if pieces is not None:
        check("pieces", pieces, torch.int64, 1, contiguous=True)
    if runs.shape[1] != 5 or piece_bytes % 4:
        raise ValueError("runs must be [R, 5] and piece_bytes a multiple of 4")
    return _lib().gp_pack_pieces(
        values.data_ptr(), _PACK_KINDS[values.dtype], runs.data_ptr(), runs.shape[0], scaling,
        None if pieces is None else pieces.data_ptr(), 0 if pieces is None else len(pieces),
        piece_bytes, elems, -1 if mirror_offset is None else mirror_offset, int(covers),
        1 if pieces is None else torch.get_num_threads())


def lora_table(starts: torch.Tensor, seg_rank: torch.Tensor, seg_pages: torch.Tensor,
               page_ids: torch.Tensor, memory: torch.Tensor, piece_bytes: int,
               mirror_offset: int, groups: list, proj_ranks: list[torch.Tensor],
               num_layers: int = 1):
    """A step's LoRA terms (native.h's gp_lora_t) for :func:`lora` and ``decode_layers``:
    the segments (starts [S + 1], seg_rank [S] int32), each segment's pages (seg_pages
    [S + 1] into page_ids, int32), the pages' ``memory`` (uint8 [pages, page bytes]), the
    pieces' size and their bf16 part's offset (adapters/paged.py), and per group in
    adapters.base.GROUPS' order (qkv, o, gate_up, down) its (A offset, BT offset) in bytes
    of the bf16 part and widths, or None where the layout lacks it, with its projections'
    ranks [P, S] int32; ``num_layers``: the layers the pieces hold (each segment's pages
    must hold its L r pieces). The tensors must outlive the struct's use."""
    num_segments = seg_rank.shape[0]
    for name, t, n in (("starts", starts, num_segments + 1), ("seg_rank", seg_rank, num_segments),
                       ("seg_pages", seg_pages, num_segments + 1)):
        check(name, t, torch.int32, 1, contiguous=True)
        if t.shape[0] != n:
            raise ValueError(f"native: {name} must hold {n} entries, not {t.shape[0]}")
    check("page_ids", page_ids, torch.int32, 1, contiguous=True)
    if memory.dtype != torch.uint8 or memory.dim() != 2 or memory.stride(1) != 1:
        raise ValueError("native: adapter page memory must be uint8 [pages, page bytes]")
    if piece_bytes < 1 or memory.shape[1] < piece_bytes:
        raise ValueError("native: a page must hold a piece")
    if page_ids.numel() and (int(page_ids.min()) < 0
                             or int(page_ids.max()) >= memory.shape[0]):
        raise ValueError("native: a page id is outside the memory")
    if num_segments and (int(seg_rank.min()) < 0 or int(seg_rank.max()) > MAX_LORA_RANK):
        raise ValueError(f"native: a segment's rank is outside 0..{MAX_LORA_RANK}")
    per_page = memory.shape[1] // max(1, piece_bytes)
    held = (seg_pages[1:] - seg_pages[:-1]).long()
    if bool((held < 0).any()) or int(seg_pages[-1]) > page_ids.numel() or bool(
            (held * per_page < num_layers * seg_rank.long()).any()):
        raise ValueError("native: a segment's pages cannot hold its adapter's pieces")
    table = Lora(num_segments=num_segments, starts=starts.data_ptr(),
                 seg_rank=seg_rank.data_ptr(), seg_pages=seg_pages.data_ptr(),
                 page_ids=page_ids.data_ptr(), base=memory.data_ptr(),
                 page_bytes=memory.stride(0), piece_bytes=piece_bytes,
                 pieces_per_page=memory.shape[1] // piece_bytes, mirror_offset=mirror_offset)
    for g, (group, ranks) in enumerate(zip(groups, proj_ranks)):
        check("proj_rank", ranks, torch.int32, 2, contiguous=True)
        p = ranks.shape[0]
        if ranks.shape[1] != num_segments:
            raise ValueError(f"native: proj_rank must be [{p}, {num_segments}]")
        a_off, bt_off, widths = group if group is not None else (0, 0, [0] * p)
        if group is None and bool((ranks > 0).any()):
            raise ValueError("native: a segment's adapter targets a group the pieces lack")
        table.groups[g] = LoraGroup(a_offset=a_off, bt_offset=bt_off, num_proj=p,
                                    widths=(ctypes.c_int64 * 3)(*widths),
                                    proj_rank=ranks.data_ptr())
    table._keep = (starts, seg_rank, seg_pages, page_ids, memory, proj_ranks)
    table.num_layers = num_layers
    table.max_rank = max(seg_rank.tolist(), default=0)  # the widest shrink, for its sums
    return table


def _check_layer(table, layer: int, group: int) -> None:
    if not 0 <= layer < table.num_layers or not 0 <= group < 4:
        raise ValueError(f"native: layer {layer} or group {group} is not in the table")


def lora(x: torch.Tensor, out: torch.Tensor, table, layer: int, group: int) -> None:
    """``out[:, projection j's columns] += x A_s^T B_{s,j}^T`` per segment s for projection
    group ``group`` (GROUPS' index) of ``layer`` (see native.c's gp_lora), the adapters read
    in place through their page tables (:func:`lora_table`). x, out: bf16 rows (unit
    stride)."""
    check("x", x, torch.bfloat16, 2)
    check("out", out, torch.bfloat16, 2)
    if out.shape[0] != x.shape[0]:
        raise ValueError("native: lora's x and out must have the same rows")
    _check_layer(table, layer, group)
    _lib().gp_lora(x.data_ptr(), x.stride(0), x.shape[1], out.data_ptr(), out.stride(0),
                   ctypes.addressof(table), layer, group, torch.get_num_threads())


def lora_half(x: torch.Tensor | None, h: torch.Tensor, out: torch.Tensor | None, table,
              layer: int, group: int) -> None:
    """:func:`lora`'s two halves apart, for a sum between them (a row-parallel group under
    tensor parallelism): with ``out`` None, the shrink: h [rows, P r_max] float32 (each
    segment's columns j r + i) from x; with ``x`` None, the expand: out += h's terms."""
    check("h", h, torch.float32, 2)
    _check_layer(table, layer, group)
    rows = h.shape[0]
    if h.shape[1] < table.groups[group].num_proj * table.max_rank:
        raise ValueError("native: h is narrower than the group's rows of the largest rank")
    for name, t in (("x", x), ("out", out)):
        if t is not None:
            check(name, t, torch.bfloat16, 2)
            if t.shape[0] != rows:
                raise ValueError(f"native: lora_half's {name} must have h's rows")
    if (x is None) == (out is None):
        raise ValueError("native: lora_half takes x (the shrink) or out (the expand)")
    _lib().gp_lora_half(0 if x is None else x.data_ptr(), 0 if x is None else x.stride(0),
                        0 if x is None else x.shape[1], h.data_ptr(), h.stride(0),
                        0 if out is None else out.data_ptr(),
                        0 if out is None else out.stride(0), ctypes.addressof(table), layer,
                        group, 0 if out is None else 1, torch.get_num_threads())


def layer_table(layers: list[dict[str, torch.Tensor]]):
    """``decode_layers``' array of native.h's gp_layer_t (plain, unpacked views; the caller
    keeps them alive), or None if a weight is not one it reads: contiguous bf16, int8 with
    bf16 scales, or 4-bit with float32 groups in x's column order; the norms bf16 or float32
    (Gemma's), all of one dtype (the table's ``norm_dtype``)."""
    entries = [name for name, _ in Layer._fields_]  # native.h names them as the model does
    if len({t.dtype for lw in layers for k, t in lw.items() if k in _NORMS}) > 1:
        return None
    table = (Layer * len(layers))()
    for lw, row in zip(layers, table):
        if any(k.endswith(("_perm", "_gcode")) for k in lw):  # x reordered first, or
            return None  # codebook 4-bit (the step's products take none): the per-op path
        for entry in entries:
            if entry.endswith("_group"):  # a 4-bit weight's group size, 0 for another kind
                w, gs = lw.get(entry[: -len("_group")]), lw.get(entry[: -len("_group")]
                                                                  + "_gscale")
                setattr(row, entry, 0 if gs is None else 2 * w.shape[1] // gs.shape[1])
                continue
            t = lw.get(entry)
            if t is None:
                if not entry.endswith(("_scale", "_bias", "_gscale", "_goffset")) and (
                        entry not in _OPTIONAL_NORMS):
                    return None
                continue
            kinds = (_NORM_DTYPES if entry in _NORMS
                     else _LAYER_DTYPES[entry.endswith(("_gscale", "_goffset"))])
            if not t.is_contiguous() or t.dtype not in kinds:
                return None
            if ((t.dtype == torch.int8 and not has_gemv_int8())
                    or (t.dtype == torch.uint8 and not has_gemv_int4())):
                return None
            setattr(row, entry, t.data_ptr())
    # (the norms' one dtype: decode_layers' final norm must have it too)
    table.norm_dtype = layers[0]["input_norm"].dtype if layers else torch.bfloat16
    return table


# the dtypes a layer's entry may have (a 4-bit weight's groups: float32; a norm's: bf16, or
# float32 for Gemma's 1 + weight)
_LAYER_DTYPES = {False: (torch.bfloat16, torch.int8, torch.uint8), True: (torch.float32,)}
_NORMS = ("input_norm", "post_norm", "q_norm", "k_norm", "pre_ff_norm", "post_ff_norm")
_OPTIONAL_NORMS = _NORMS[2:]  # each head's (Qwen3, Gemma 3), the sandwich's (Gemma)
_NORM_DTYPES = (torch.bfloat16, torch.float32)



def step_ends(weights: dict[str, torch.Tensor], lm_head: str, scale_suffix: str):
    """(embedding, head) for :func:`decode_layers` to run the model's first and last ops too:
    each (plain weight, int8 row scales or None), or None when one is not a form its kernels
    read (contiguous bf16 with the bf16 GEMV; int8 with bf16 scales with the int8 one)."""
    parts = []
    for name in ("embed_tokens", lm_head):
        w, sc = weights[name], weights.get(name + scale_suffix)
        ok = w.is_contiguous() and (
            (sc is None and w.dtype == torch.bfloat16 and has_gemv())
            or (sc is not None and w.dtype == torch.int8 and sc.dtype == torch.bfloat16
                and sc.is_contiguous() and has_gemv_int8()))
        if not ok:
            return None
        parts.append((w, sc))
    return tuple(parts)


def decode_layers(x: torch.Tensor, table, num_layers: int, inter: int, num_heads: int,
                  num_kv_heads: int, head_dim: int, eps: float, cos_sin: torch.Tensor,
                  positions: torch.Tensor, kv, slot_pages: torch.Tensor,
                  slot_offsets: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, scale: float, final_norm: torch.Tensor,
                  ids: torch.Tensor | None = None, embed: tuple | None = None,
                  head: tuple | None = None, lora=None, tp=None,
                  windows: torch.Tensor | None = None, window_group: tuple | None = None,
                  gelu: bool = False, softcap: float = 0.0, rope_local: tuple | None = None):
    """Every layer of a decode step of a few rows in one call (the same kernels, in the same
    order, as the per-op path). x: [T, hidden] contiguous, the embeddings (updated in place);
    or, with ``ids`` [T] and ``embed`` = (table, int8 scales or None), filled with those rows
    first. Returns the final norm's output [T, hidden]; or, with ``head`` = (weight [V,
    hidden], int8 scales or None), the float32 logits [T, V] of it (the GEMVs' rounding).
    table: :func:`layer_table`; kv: a :class:`KVTable` of the layers' caches; lora: None, or the
    step's :func:`lora_table`; tp: None, or a tensor-parallel rank's :class:`TPTable` (the o and
    down products' all-reduce inside the call; no LoRA then); windows: None, or each layer's
    sliding window (int64 [layers], 0: none); window_group: where ``kv`` has two KV groups,
    the windowed layers' (slot pages, slot offsets, block tables), else None. Gemma's:
    float32 norms (``final_norm``'s dtype says the layers' too), ``gelu`` (GeGLU, else SiLU x
    up), ``softcap`` (the scores' cap, 0: none), ``rope_local`` = (Gemma 3's windowed layers'
    rotary table, each layer's flag int64 [layers]) or None. RuntimeError where a rank is
    gone or keeps the others waiting past models.tp.TIMEOUT_S."""
    t, hidden = x.shape
    check("x", x, torch.bfloat16, 2, contiguous=True)
    if (window_group is not None) != kv.mixed:
        raise ValueError("native: decode_layers takes the windowed layers' slots and tables "
                         "where its KVTable has their group, and only there")
    named = [("positions", positions, torch.int64, 1), ("slot_pages", slot_pages, torch.int64, 1),
             ("slot_offsets", slot_offsets, torch.int64, 1),
             ("context_lens", context_lens, torch.int32, 1),
             ("block_tables", block_tables, torch.int32, 2)]
    if window_group is not None:
        named += [("window_slot_pages", window_group[0], torch.int64, 1),
                  ("window_slot_offsets", window_group[1], torch.int64, 1),
                  ("window_block_tables", window_group[2], torch.int32, 2)]
    for name, v, dtype, dims in named:
        check(name, v, dtype, dims, contiguous=dims == 1)
        if v.shape[0] != t:
            raise ValueError(f"native: decode_layers' {name} must have {t} rows")
    check("cos_sin", cos_sin, torch.bfloat16, 3, contiguous=True)
    _check_norm_weight(final_norm, "final_norm")
    if final_norm.dtype != getattr(table, "norm_dtype", torch.bfloat16):
        raise ValueError("native: decode_layers' final norm and its layers' norms must share "
                         "one dtype")
    if rope_local is not None:
        check("cos_sin_local", rope_local[0], torch.bfloat16, 3, contiguous=True)
        check("local_layers", rope_local[1], torch.int64, 1, contiguous=True)
        if rope_local[0].shape != cos_sin.shape or rope_local[1].shape[0] != num_layers:
            raise ValueError("native: decode_layers' local rotary table must be shaped as "
                             "cos_sin, its flags one a layer")
    if len(table) != num_layers or len(kv.arrays[0]) != num_layers:
        raise ValueError(f"native: decode_layers needs {num_layers} layers' weights and caches")
    if ids is not None:
        check("ids", ids, torch.int64, 1, contiguous=True)
    if windows is not None:
        check("windows", windows, torch.int64, 1, contiguous=True)
        if windows.shape[0] != num_layers:
            raise ValueError(f"native: decode_layers needs {num_layers} layers' windows")
    if tp is not None and not tp.fits(t * hidden):
        raise ValueError("native: decode_layers under tensor parallelism takes steps whose rows "
                         "fit the exchange's slots")
    if tp is not None and lora is not None and not tp.fits(t * lora.max_rank):
        raise ValueError("native: decode_layers under tensor parallelism takes LoRA shrinks "
                         "that fit the exchange's slots")
    out = torch.empty_like(x)
    logits = None if head is None else torch.empty(t, head[0].shape[0], dtype=torch.float32)
    step = Step(rows=t, hidden=hidden, inter=inter, num_heads=num_heads,
                num_kv_heads=num_kv_heads, head_dim=head_dim, num_layers=num_layers, eps=eps,
                scale=scale, layers=ctypes.addressof(table), kv=ctypes.addressof(kv.struct),
                cos_sin=cos_sin.data_ptr(), positions=positions.data_ptr(),
                slot_pages=slot_pages.data_ptr(), slot_offsets=slot_offsets.data_ptr(),
                block_tables=block_tables.data_ptr(), block_table_stride=block_tables.stride(0),
                context_lens=context_lens.data_ptr(), final_norm=final_norm.data_ptr(),
                x=x.data_ptr(), out=out.data_ptr(), ids=_p(ids),
                embed=None if embed is None else embed[0].data_ptr(),
                embed_scale=None if embed is None else _p(embed[1]),
                head=None if head is None else head[0].data_ptr(),
                head_scale=None if head is None else _p(head[1]),
                vocab=0 if head is None else head[0].shape[0], logits=_p(logits),
                lora=None if lora is None else ctypes.addressof(lora),
                tp=None if tp is None else ctypes.addressof(tp.struct), windows=_p(windows),
                norm_f32=int(final_norm.dtype == torch.float32), act=int(gelu),
                softcap=softcap)
    if rope_local is not None:
        step.cos_sin_local, step.local_layers = (rope_local[0].data_ptr(),
                                                 rope_local[1].data_ptr())
    if window_group is not None:
        step.window_slot_pages, step.window_slot_offsets = (window_group[0].data_ptr(),
                                                           window_group[1].data_ptr())
        step.window_block_tables = window_group[2].data_ptr()
        step.window_block_table_stride = window_group[2].stride(0)
    if tp is not None:
        tp.seq[0] = tp.shm.seq
        tp.struct.timeout_ms = int(tp.shm.timeout_s * 1000)
    rc = _lib().gp_decode_layers(ctypes.byref(step), torch.get_num_threads())
    if tp is not None:
        tp.shm.seq = int(tp.seq[0])  # the exchanges made inside, as ShmExchange counts them
    if rc == 2:
        raise RuntimeError("a tensor-parallel rank is gone or did not answer")
    if rc:
        raise MemoryError("decode_layers could not allocate its buffers")
    return out if logits is None else logits


_ALIVE = ctypes.CFUNCTYPE(ctypes.c_int)


class TPTable:
    """``decode_layers``' view of a tensor-parallel rank's shared-memory exchange (a
    models.tp.ShmExchange): native.h's gp_tp_t over the same file, with the exchange's
    alive() as a C callback (asked by OpenMP's thread 0, the one that called in; ctypes
    took the GIL off it for the call (CDLL), the callback takes it again)."""

    def __init__(self, shm):
        self.shm = shm
        self.seq = torch.zeros(1, dtype=torch.int64)

        def alive() -> int:
            try:
                return int(shm.alive is None or bool(shm.alive()))
            except Exception:  # noqa: BLE001 - a failing check counts as a dead peer
                return 0

        self._alive = _ALIVE(alive)  # kept: C holds its address
        self.struct = Tp(flags=shm.flags.data_ptr(), slots=shm.buf.data_ptr() + shm.FLAGS,
                         slot_bytes=shm.slot_bytes, rank=shm.rank, world=shm.world,
                         seq=self.seq.data_ptr(),
                         alive=ctypes.cast(self._alive, ctypes.c_void_p).value,
                         timeout_ms=int(shm.timeout_s * 1000))  # again at each call

    def fits(self, numel: int) -> bool:
        return numel * 4 <= self.shm.slot_bytes


class KVTable:
    """``decode_layers``' view of a model's KV caches: native.h's gp_kv_t with the address
    arrays it points at (the caller keeps the views alive; the backend makes it once per
    cache)."""

    def __init__(self, kv_layers: list, groups: list[int] | None = None):
        """``groups``: each layer's KV group (1: a windowed layer whose pages are its group's
        own, a model mixing global and windowed layers), or None (one group)."""
        n = len(kv_layers)
        groups = groups or [0] * n
        if len(groups) != n or not set(groups) <= {0, 1} or 0 not in groups:
            raise ValueError("native: a KVTable's groups are 0 or 1 a layer, some layer's 0")
        first = {g: kv_layers[groups.index(g)][0] for g in set(groups)}
        for (k, v), g in zip(kv_layers, groups):  # [pages, block_tokens, kv heads, D]
            k0 = first[g]
            for name, c in (("k cache", k), ("v cache", v)):
                check(name, c, torch.bfloat16, 4)
                if c.shape != k0.shape or c.stride() != k0.stride() or c.stride()[1:] != (
                        c.shape[2] * c.shape[3], c.shape[3], 1):
                    raise ValueError(f"native: every layer's {name} must be dense pages of "
                                     f"one shape and stride (its KV group's)")
        if any(c.stride(0) != first[0].stride(0) or c.shape[2:] != first[0].shape[2:]
               for c in first.values()):  # (the same pages, seen by each group)
            raise ValueError("native: the KV groups' pages must have one stride and head shape")
        self.arrays = ((ctypes.c_void_p * n)(*(k.data_ptr() for k, _ in kv_layers)),
                       (ctypes.c_void_p * n)(*(v.data_ptr() for _, v in kv_layers)),
                       (ctypes.c_int64 * n)(*groups))
        self.mixed = 1 in groups
        self.struct = KV(k=ctypes.addressof(self.arrays[0]), v=ctypes.addressof(self.arrays[1]),
                         page_stride=first[0].stride(0), block_tokens=first[0].shape[1],
                         groups=ctypes.addressof(self.arrays[2]) if self.mixed else None,
                         window_block_tokens=first[1].shape[1] if self.mixed else 0)


def add_rmsnorm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x += delta`` (in place, if given), then ``rms_norm(x, weight)`` into ``out``.
    x, delta, out: [rows, dim] bf16 with unit stride in dim; weight: [dim] contiguous, bf16,
    or float32 (Gemma's 1 + weight: scaled in float32 and rounded once, as
    ``reference.rms_norm``)."""
    check("x", x, torch.bfloat16, 2)
    _check_norm_weight(weight)
    for name, t in (("delta", delta), ("out", out)):
        if t is not None:
            check(name, t, torch.bfloat16, 2)
            if t.shape != x.shape:
                raise ValueError(f"native: add_rmsnorm's {name} must be shaped as x")
    rows, dim = x.shape
    if weight.shape[0] != dim:  # (a longer or shorter one would be read out of its bounds)
        raise ValueError(f"native: add_rmsnorm's weight has {weight.shape[0]} values for rows "
                         f"of {dim}")
    if out is None:
        out = torch.empty_like(x)
    _lib().gp_add_rmsnorm(x.data_ptr(), x.stride(0), _p(delta),
                          0 if delta is None else delta.stride(0), weight.data_ptr(),
                          int(weight.dtype == torch.float32), out.data_ptr(), out.stride(0),
                          rows, dim, eps, torch.get_num_threads())
    return out


def _check_norm_weight(weight: torch.Tensor, name: str = "weight") -> None:
    if weight.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"native: a norm's {name} must be bf16 or float32, not {weight.dtype}")
    check(name, weight, weight.dtype, 1, contiguous=True)


def head_norms(qkv: torch.Tensor, first: int, count: int, head_dim: int, weight: torch.Tensor,
               eps: float) -> None:
    """Heads ``first`` .. ``first + count - 1`` of every row of ``qkv`` ([rows, n head_dim]
    bf16, unit stride in the row) normed in place, each as one row of :func:`add_rmsnorm`
    with ``weight`` [head_dim] (bf16, or float32: Gemma 3's; the q_norm and k_norm of Qwen3
    and Gemma 3; ``decode_layers`` the same)."""
    check("qkv", qkv, torch.bfloat16, 2)
    _check_norm_weight(weight)
    if (weight.shape[0] != head_dim or head_dim > MAX_HEAD_DIM or first < 0
            or (first + count) * head_dim > qkv.shape[1]):
        raise ValueError(f"native: head_norms' heads {first}..{first + count} of {head_dim} "
                         f"do not fit rows of {qkv.shape[1]} or weight {tuple(weight.shape)}")
    _lib().gp_head_norms(qkv.data_ptr(), qkv.stride(0), qkv.shape[0], first, count, head_dim,
                         weight.data_ptr(), int(weight.dtype == torch.float32), eps,
                         torch.get_num_threads())


def gelu_tanh_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Gemma's GeGLU of ``gate_up`` [rows, 2 * inter] (gate first): ``gelu(gate) * up``,
    gelu with the tanh approximation in float32 as g / (1 + e^-2y) rounded once, then the
    product rounded: within a bf16 step of float64 everywhere, torch's bits on most values
    (``reference.act_mul(..., "gelu_tanh")``, whose 1 + tanh(y) cancels below g = -2)."""
    check("gate_up", gate_up, torch.bfloat16, 2)
    rows, two = gate_up.shape
    if two % 2:
        raise ValueError("native: gelu_tanh_mul's gate_up must have an even width")
    out = torch.empty(rows, two // 2, dtype=torch.bfloat16)
    _lib().gp_gelu_tanh_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(),
                            out.stride(0), rows, two // 2, torch.get_num_threads())
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` [rows, 2 * inter] (gate first)."""
    check("gate_up", gate_up, torch.bfloat16, 2)
    rows, two = gate_up.shape
    out = torch.empty(rows, two // 2, dtype=gate_up.dtype)
    _lib().gp_silu_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), out.stride(0),
                       rows, two // 2, torch.get_num_threads())
    return out


def swiglu_oai(gate_up: torch.Tensor, limit: float, alpha: float) -> torch.Tensor:
    """gpt-oss's clamped SwiGLU of bf16 ``gate_up`` [rows, 2 * inter] (gate first): each
    operation of ``reference.swiglu_oai`` rounded to bf16 as torch's are, its sigmoid from
    native.c's exp (the same bits in every build; torch's may differ by a bf16 step)."""
    check("gate_up", gate_up, torch.bfloat16, 2)
    rows, two = gate_up.shape
    out = torch.empty(rows, two // 2, dtype=gate_up.dtype)
    _lib().gp_swiglu_oai(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), out.stride(0),
                         rows, two // 2, limit, alpha, torch.get_num_threads())
    return out


def rope_kv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
            cos_sin: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, slot_pages: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """RoPE on qkv's q and k heads in place ([T, (H + 2 KVH) * D], unit stride in a row;
    cos_sin: the [positions, 2, D] table), then each row's k and v into its KV slot
    (caches: [P, bt, KVH, D] views with unit strides inside a page)."""
    check("qkv", qkv, torch.bfloat16, 2)
    check("cos_sin", cos_sin, torch.bfloat16, 3, contiguous=True)
    rows = qkv.shape[0]
    if (qkv.shape[1] < (num_heads + 2 * num_kv_heads) * head_dim
            or positions.shape[0] != rows or slot_pages.shape[0] != rows):
        raise ValueError("native: rope_kv's qkv, positions and slots do not fit")
    _lib().gp_rope_kv(qkv.data_ptr(), qkv.stride(0), qkv.shape[0], num_heads, num_kv_heads,
                      head_dim, cos_sin.data_ptr(), positions.data_ptr(), k_cache.data_ptr(),
                      v_cache.data_ptr(), k_cache.stride(0), slot_pages.data_ptr(),
                      slot_offsets.data_ptr(), torch.get_num_threads())


def _sinks(sinks: torch.Tensor | None, num_heads: int) -> tuple[torch.Tensor | None, int]:
    """(the float32 sinks, kept alive for the call, and their address, 0 for none)."""
    if sinks is None:
        return None, 0
    sinks = sinks.float().contiguous()
    if sinks.shape != (num_heads,):
        raise ValueError(f"native: attention sinks must be one a query head ({num_heads})")
    return sinks, sinks.data_ptr()


def decode_attention(q: torch.Tensor, num_heads: int, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int = 0,
                     sinks: torch.Tensor | None = None, softcap: float = 0.0) -> torch.Tensor:
    """q: [B, >= H * D] rows (e.g. the leading part of qkv rows); caches [P, bt, KVH, D];
    block_tables [B, M] int32 contiguous; context_lens [B] int32; ``window``: a row sees only
    its last ``window`` keys (0: all); ``sinks`` [H]: each head's logit beside the scores
    (gpt-oss); ``softcap``: scores become cap tanh(s / cap) (Gemma 2; 0: none). Returns
    [B, H * D]."""
    check("q", q, torch.bfloat16, 2)
    check("block_tables", block_tables, torch.int32, 2)
    check("context_lens", context_lens, torch.int32, 1, contiguous=True)
    if block_tables.shape[0] != q.shape[0] or context_lens.shape[0] != q.shape[0]:
        raise ValueError("native: decode_attention needs a block table and a length a row")
    b = q.shape[0]
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    out = torch.empty(b, num_heads * d, dtype=q.dtype)
    sinks, sinks_ptr = _sinks(sinks, num_heads)
    _lib().gp_decode_attention(q.data_ptr(), q.stride(0), b, num_heads, kvh, d,
                               k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
                               k_cache.shape[1], block_tables.data_ptr(),
                               block_tables.stride(0), context_lens.data_ptr(), scale,
                               out.data_ptr(), window, sinks_ptr, softcap or 0.0,
                               torch.get_num_threads())
    return out


def has_prefill_attention(head_dim: int) -> bool:
    """Whether :func:`prefill_attention` runs here: built (AVX-512 BF16, or AVX2 + FMA),
    head_dim % 16 == 0."""
    return _has(4) and head_dim % 16 == 0


def prefill_attention(q: torch.Tensor, num_heads: int, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens: torch.Tensor, context_lens: torch.Tensor,
                      scale: float, window: int = 0, sinks: torch.Tensor | None = None,
                      softcap: float = 0.0) -> torch.Tensor | None:
    """``kernels.reference.paged_attention_prefill`` on the pages in place (see native.c):
    q: [T, >= H * D] rows (the leading part of qkv rows); caches [P, bt, KVH, D]; block_tables
    [S, M], cu_seqlens [S + 1], context_lens [S] int32 contiguous; ``window``: a token sees
    only its last ``window`` keys, itself included (0: all); ``sinks`` and ``softcap`` as
    :func:`decode_attention`'s. Returns [T, H * D], or None if the kernel could not run (no
    memory: the caller takes the torch path)."""
    check("q", q, torch.bfloat16, 2)
    check("cu_seqlens", cu_seqlens, torch.int32, 1, contiguous=True)
    if cu_seqlens.shape[0] != context_lens.shape[0] + 1:
        raise ValueError("native: prefill_attention's cu_seqlens must hold one more entry "
                         "than context_lens")
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    out = torch.empty(q.shape[0], num_heads * d, dtype=q.dtype)
    sinks, sinks_ptr = _sinks(sinks, num_heads)
    rc = _lib().gp_prefill_attention(
        q.data_ptr(), q.stride(0), context_lens.shape[0], cu_seqlens.data_ptr(),
        context_lens.data_ptr(), num_heads, kvh, d, k_cache.data_ptr(), v_cache.data_ptr(),
        k_cache.stride(0), k_cache.shape[1], block_tables.data_ptr(), block_tables.stride(0),
        scale, out.data_ptr(), out.stride(0), window, sinks_ptr, softcap or 0.0,
        torch.get_num_threads())
    return None if rc else out


# ---- the torch versions (kernels.reference), and the check against them ------------------------
def add_rmsnorm_torch(x, delta, weight, eps):
    """What :func:`add_rmsnorm` computes, in torch ops (returns (x + delta, normed))."""
    from gpupool.kernels.reference import rms_norm

    if delta is not None:
        x = x + delta
    return x, rms_norm(x, weight, eps)


def failures(seed: int = 0) -> list[str]:
    """The kernels whose output differs from their torch version on small random inputs by
    more than bf16 rounding explains (empty: all agree)."""
    from gpupool.kernels import reference
    from gpupool.kernels.reference import apply_rope

    g = torch.Generator().manual_seed(seed)
    bf = torch.bfloat16

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(bf)

    def close(a, b, tol=2e-2):
        return bool(((a.float() - b.float()).abs() <= tol * (1 + b.float().abs())).all())

    bad = []
    x, delta, w = rnd(3, 40), rnd(3, 40), rnd(40)
    want_x, want = add_rmsnorm_torch(x, delta, w, 1e-5)
    got = add_rmsnorm(x, delta, w, 1e-5)  # x is updated in place
    if not (torch.equal(x, want_x) and close(got, want)):
        bad.append("add_rmsnorm")
    w32 = torch.rand(40, generator=g) + 0.5  # Gemma's 1 + weight, float32
    if not close(add_rmsnorm(x.clone(), None, w32, 1e-6), reference.rms_norm(x, w32, 1e-6)):
        bad.append("add_rmsnorm (float32 weight)")
    gu = rnd(3, 2 * 24)
    if not close(silu_mul(gu), reference.silu_mul(gu)):
        bad.append("silu_mul")
    if not close(gelu_tanh_mul(gu * 3), reference.act_mul(gu * 3, "gelu_tanh")):
        bad.append("gelu_tanh_mul")
    # 2 sequences, 4 heads over 2 KV heads, D 8, pages of 4 tokens
    h, kvh, d, bt, pages = 4, 2, 8, 4, 6
    kv = rnd(pages, 2, bt, kvh, d)
    k_cache, v_cache = kv[:, 0], kv[:, 1]
    table = torch.tensor([[1, 4, 0], [5, 2, 3]], dtype=torch.int32)
    lens = torch.tensor([7, 10], dtype=torch.int32)
    positions = (lens - 1).long()
    qkv = rnd(2, (h + 2 * kvh) * d)
    cos_sin = rnd(16, 2, d)
    q_want = apply_rope(qkv[:, : h * d].view(2, h, d), cos_sin[positions, 0:1],
                        cos_sin[positions, 1:2])
    k_want = apply_rope(qkv[:, h * d : (h + kvh) * d].view(2, kvh, d),
                        cos_sin[positions, 0:1], cos_sin[positions, 1:2])
    v_want = qkv[:, (h + kvh) * d :].view(2, kvh, d).clone()
    slot_pages = table[torch.arange(2), positions // bt].long()
    slot_offsets = positions % bt
    rope_kv(qkv, h, kvh, d, cos_sin, positions, k_cache, v_cache, slot_pages, slot_offsets)
    if not (torch.equal(qkv[:, : h * d].view(2, h, d), q_want)
            and torch.equal(k_cache[slot_pages, slot_offsets], k_want)
            and torch.equal(v_cache[slot_pages, slot_offsets], v_want)):
        bad.append("rope_kv")
    want = reference.paged_attention_decode(qkv[:, : h * d].reshape(2, h, d), k_cache, v_cache,
                                            table, lens, d**-0.5)
    got = decode_attention(qkv, h, k_cache, v_cache, table, lens, d**-0.5)
    if not close(got.view(2, h, d), want):
        bad.append("decode_attention")
    logits = torch.randn(3, 200, generator=g)
    logits[1, 7] = logits[1, 150] = logits[1].max() + 1  # a tie: the first index wins
    if argmax(logits[:, :130]) != logits[:, :130].argmax(-1).tolist():
        bad.append("argmax")
    logits[0, 3], logits[2, 120] = float("nan"), float("-inf")
    if finite_rows(logits[:, :130]) != [False, True, False]:
        bad.append("finite_rows")
    xs, w, b = rnd(3, 100)[:, :72], rnd(40, 72), rnd(40)  # a strided x, K not 32's multiple
    features = _STATE["features"]
    if features & 1 and not close(gemv(xs, w, b), torch.nn.functional.linear(xs, w, b)):
        bad.append("gemv")
    q = torch.randint(-127, 128, (40, 72), generator=g, dtype=torch.int8)
    scale = (torch.rand(40, generator=g) * 0.02).to(bf)
    want = torch.nn.functional.linear(xs, q.to(bf)) * scale + b
    if features & 2 and not close(gemv_int8(xs, q, scale, b), want):
        bad.append("gemv_int8")
    if features & 16:  # 4-bit: 2 groups of 32 over 64 columns, strided x
        from gpupool.kernels import quant4

        x4 = rnd(3, 100)[:, :64]
        q4, s4, o4 = quant4.quantize(torch.randn(40, 64, generator=g), 32)
        code = torch.tensor(quant4.E2M1)
        if not (close(gemv_int4(x4, q4, s4, o4, b),
                      quant4.linear_int4_reference(x4, q4, s4, o4, b))
                and close(gemv_int4(x4, q4, s4, o4, b, code),
                          quant4.linear_int4_reference(x4, q4, s4, o4, b, code=code))):
            bad.append("gemv_int4")
    if features & 4:  # prefill: sequence 0's last 3 tokens after its prefix, 1's first 4
        cu, ctx = torch.tensor([0, 3, 7], dtype=torch.int32), torch.tensor([7, 4],
                                                                           dtype=torch.int32)
        d = 16
        kv = rnd(pages, 2, bt, kvh, d)
        q = rnd(7, h * d)
        want = reference.paged_attention_prefill(q.view(7, h, d), kv[:, 0], kv[:, 1], table, cu,
                                                 ctx, d**-0.5)
        got = prefill_attention(q, h, kv[:, 0], kv[:, 1], table, cu, ctx, d**-0.5)
        if got is None or not close(got.view(7, h, d), want):
            bad.append("prefill_attention")
    return bad
