"""native.c builds without a warning for every x86-64 level the project's users run, with GCC
and Clang where installed, and its bf16 GEMV and attention compute the same bits in the AVX2
build as in the AVX-512 BF16 one (so a worker without AVX-512 continues a request exactly)."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess

import pytest
import torch

from gpupool.kernels import native
from gpupool.models.cpu import cpu_flags

X86 = platform.machine().lower() in ("x86_64", "amd64")
TARGETS = ("x86-64", "x86-64-v3", "skylake-avx512", "icelake-server", "sapphirerapids")
AVX512_FREE = ("x86-64", "x86-64-v3")
COMPILERS = [cc for cc in ("gcc", "clang") if shutil.which(cc)]
WARNINGS = ["-Wall", "-Wextra", "-Werror"]

pytestmark = pytest.mark.skipif(not X86, reason="x86-64 targets (this machine is not x86-64)")


def test_every_target_builds_without_a_warning(tmp_path):
    """Each compiler x target with OpenMP, and the two AVX-512-free targets without it (as
    on macOS, where torch ships no libgomp), compiled at once (2 cores: ~8 s). GCC warns
    about the OpenMP pragmas a build without OpenMP ignores: -Wno-unknown-pragmas there, as
    that build means to ignore them."""
    if not COMPILERS:
        pytest.skip("no gcc or clang on PATH")
    jobs = {}
    for cc in COMPILERS:
        for march in TARGETS:
            for omp in (["-fopenmp"], ["-Wno-unknown-pragmas"]):
                if omp[0] != "-fopenmp" and march not in AVX512_FREE:
                    continue
                cmd = [cc, *native.COMPILE_FLAGS, native.recip_flag(cc), f"-march={march}", *omp,
                       *WARNINGS, "-c",
                       str(native.SOURCE), "-o", str(tmp_path / f"{cc}-{march}-{len(jobs)}.o")]
                jobs[f"{cc} -march={march} {omp[0]}"] = subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed = {}
    for name, proc in jobs.items():
        out, _ = proc.communicate(timeout=300)
        if proc.returncode:
            failed[name] = native.first_error(out)
    assert failed == {}
    assert len(jobs) == (len(TARGETS) + len(AVX512_FREE)) * len(COMPILERS)


def _gemv(lib, x, w, bias):
    """gp_gemv_bf16 of one loaded build (native.open_library)."""
    rows, k = x.shape
    n = w.shape[0]
    y = torch.empty(rows, n, dtype=torch.bfloat16)
    lib.gp_gemv_bf16(x.data_ptr(), rows, k, x.stride(0), w.data_ptr(), n, w.stride(0),
                     None if bias is None else bias.data_ptr(), y.data_ptr(), n, 2)
    return y.view(torch.int16)


def _cases():
    """Shapes on both sides of every block edge (K = 1 .. 700: tails, whole 32s, 128s; a
    strided x), values from tiny to huge, denormal bf16 inputs, zeros, infinities."""
    g = torch.Generator().manual_seed(7)
    for i in range(120):
        rows = (1, 2, 3, 4, 5, 9, 17, 40)[i % 8]  # every tile height, several tiles
        k = int(torch.randint(1, 700, (1,), generator=g))
        n = int(torch.randint(1, 200, (1,), generator=g))
        scale = (1.0, 1e-19, 1e-37, 1e30, 1.0)[i % 5]
        x = (torch.randn(rows, k + 3, generator=g) * scale).to(torch.bfloat16)[:, :k]
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        if i % 3 == 0:  # denormal bf16 (exponent bits 0) in x and w
            x.view(torch.int16)[:, ::5] &= 0x807F
            w.view(torch.int16)[:, ::7] &= 0x807F
        if i % 7 == 0:
            w[:, ::11] = 0.0
        if i % 11 == 0:
            x[0, 0] = float("inf")
        bias = torch.randn(n, generator=g).to(torch.bfloat16) if i % 2 else None
        yield x, w, bias


@pytest.fixture(scope="module")
def both_builds(tmp_path_factory) -> dict:
    """The AVX2 build and this CPU's own (AVX-512 BF16), loaded (built once for the module's
    tests); skips where either cannot run or there is no compiler."""
    if "avx2" not in cpu_flags() or "fma" not in cpu_flags():
        pytest.skip("this CPU has no AVX2 + FMA: the AVX2 build cannot run here")
    if "avx512_bf16" not in cpu_flags():
        pytest.skip("this CPU has no AVX-512 BF16: only the AVX2 build runs here, nothing to "
                    "compare it with")
    if native._compiler() is None:
        pytest.skip("no C compiler")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPUPOOL_NATIVE_DIR", str(tmp_path_factory.mktemp("builds")))
        return {march: native.open_library(native.build(march))
                for march in ("x86-64-v3", "native")}


def test_the_avx2_gemv_is_bit_identical_to_the_avx512_bf16_one(both_builds):
    libs = both_builds
    features = {march: lib.gp_gemv_features() for march, lib in libs.items()}
    assert features["x86-64-v3"] & 9 == 9 and features["native"] & 9 == 1  # AVX2 vs BF16
    compared = 0
    for x, w, bias in _cases():
        avx2, bf16 = _gemv(libs["x86-64-v3"], x, w, bias), _gemv(libs["native"], x, w, bias)
        assert torch.equal(avx2, bf16), (tuple(x.shape), tuple(w.shape), bias is None)
        compared += 1
    assert compared == 120


def test_the_avx2_activations_are_bit_identical_to_the_avx512_ones(both_builds):
    """SiLU x up, gpt-oss's clamped SwiGLU and Gemma's GeGLU (exp_fixed's float32
    operations, which the compiler vectorises on 8 or 16 lanes) give the same bits in both
    builds, on gates and ups from tiny to past the clamp and exp's range; so do Gemma's
    norms (float32 weights)."""
    libs = both_builds
    g = torch.Generator().manual_seed(5)
    for rows, inter, spread in ((1, 24, 1.0), (5, 1536, 6.0), (64, 100, 40.0)):
        gu = (torch.randn(rows, 2 * inter, generator=g) * spread).to(torch.bfloat16)
        outs = {}
        for march, lib in libs.items():
            silu = torch.empty(rows, inter, dtype=torch.bfloat16)
            swiglu = torch.empty(rows, inter, dtype=torch.bfloat16)
            gelu = torch.empty(rows, inter, dtype=torch.bfloat16)
            normed = torch.empty(rows, 2 * inter, dtype=torch.bfloat16)
            w32 = torch.rand(2 * inter, generator=torch.Generator().manual_seed(6)) + 0.5
            lib.gp_silu_mul(gu.data_ptr(), 2 * inter, silu.data_ptr(), inter, rows, inter, 2)
            lib.gp_swiglu_oai(gu.data_ptr(), 2 * inter, swiglu.data_ptr(), inter, rows, inter,
                              ctypes.c_float(7.0), ctypes.c_float(1.702), 2)
            lib.gp_gelu_tanh_mul(gu.data_ptr(), 2 * inter, gelu.data_ptr(), inter, rows,
                                 inter, 2)
            lib.gp_add_rmsnorm(gu.data_ptr(), 2 * inter, None, 0, w32.data_ptr(), 1,
                               normed.data_ptr(), 2 * inter, rows, 2 * inter,
                               ctypes.c_float(1e-6), 2)
            outs[march] = tuple(t.view(torch.int16) for t in (silu, swiglu, gelu, normed))
        for a, b in zip(outs["x86-64-v3"], outs["native"]):
            assert torch.equal(a, b), (rows, inter, spread)


def _attention_cases():
    """Paged caches (shuffled pages of a two-layer storage), chunks over a cached past, one or
    several sequences, head sizes 16-128, groups 1-4; scores from tame to spread so wide
    that probabilities underflow to float32 denormals and zero."""
    g = torch.Generator().manual_seed(11)
    for i in range(24):
        d, group, kvh = (16, 32, 64, 128)[i % 4], (1, 2, 4)[i % 3], 1 + i % 2
        bt = (1, 5, 16, 32)[i % 4]
        news = [int(torch.randint(1, 80, (1,), generator=g)) for _ in range(1 + i % 3)]
        pasts = [int(torch.randint(0, 150, (1,), generator=g)) for _ in news]
        ctx = [n + p for n, p in zip(news, pasts)]
        pages = [-(-c // bt) for c in ctx]
        storage = torch.randn(sum(pages) + 3, 2, 2, bt, kvh, d, generator=g)
        spread = (1.0, 4.0, 30.0)[i % 3]  # x 30: score gaps past 87 (e^x underflows)
        storage = (storage * spread).to(torch.bfloat16)
        k_cache, v_cache = storage[:, 1, 0], storage[:, 1, 1]
        perm = torch.randperm(storage.shape[0], generator=g).tolist()
        tables = torch.zeros(len(news), max(pages), dtype=torch.int32)
        for s, n in enumerate(pages):
            tables[s, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
        q = (torch.randn(sum(news), kvh * group * d + 7, generator=g) * spread).to(
            torch.bfloat16)  # rows of a wider tensor (q leads each qkv row)
        cu = torch.tensor([0, *torch.tensor(news).cumsum(0).tolist()], dtype=torch.int32)
        yield q, k_cache, v_cache, tables, cu, torch.tensor(ctx, dtype=torch.int32), group


def _attention(lib, q, k_cache, v_cache, tables, cu, ctx, group, decode, window=0,
               sinks=None, softcap=0.0):
    """gp_prefill_attention of one build, or (decode) gp_decode_attention of each sequence's
    last row over all its tokens (``window``: a sliding window, 0 none; ``sinks``: float32
    logits a query head, or None)."""
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    nq = kvh * group
    sink = 0 if sinks is None else sinks.data_ptr()
    if decode:
        rows = q[(cu[1:] - 1).long()].contiguous()
        out = torch.empty(rows.shape[0], nq * d, dtype=torch.bfloat16)
        lib.gp_decode_attention(rows.data_ptr(), rows.stride(0), rows.shape[0], nq, kvh, d,
                                k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
                                k_cache.shape[1], tables.data_ptr(), tables.stride(0),
                                ctx.data_ptr(), 0.125, out.data_ptr(), window, sink, softcap,
                                2)
        return out.view(torch.int16)
    out = torch.empty(q.shape[0], nq * d, dtype=torch.bfloat16)
    rc = lib.gp_prefill_attention(q.data_ptr(), q.stride(0), ctx.shape[0], cu.data_ptr(),
                                  ctx.data_ptr(), nq, kvh, d, k_cache.data_ptr(),
                                  v_cache.data_ptr(), k_cache.stride(0), k_cache.shape[1],
                                  tables.data_ptr(), tables.stride(0), 0.125, out.data_ptr(),
                                  out.stride(0), window, sink, softcap, 2)
    assert rc == 0
    return out.view(torch.int16)


def test_the_avx2_attention_is_bit_identical_to_the_avx512_bf16_one(both_builds):
    """Prefill chunks and decode rows (the same kernel) give the same bits in both builds, so
    an AVX2 worker's attention continues an AVX-512 worker's request exactly; sliding windows
    too (none, inside a key block, a block's width), gpt-oss's sinks on every other, Gemma
    2's soft cap (of 50, or of 2: most scores capped) on two of every three."""
    libs = both_builds
    assert all(lib.gp_gemv_features() & 4 for lib in libs.values())
    compared = 0
    for i, case in enumerate(_attention_cases()):
        window = (0, 37, 64)[i % 3]
        nq = case[1].shape[2] * case[6]
        sinks = torch.randn(nq, generator=torch.Generator().manual_seed(i)) * 3 if i % 2 else None
        softcap = (0.0, 50.0, 2.0)[(i // 3) % 3]
        for decode in (False, True):
            avx2, bf16 = (_attention(libs[m], *case, decode, window, sinks, softcap)
                          for m in ("x86-64-v3", "native"))
            assert torch.equal(avx2, bf16), (compared, decode, window, tuple(case[0].shape))
            compared += 1
    assert compared == 48


def test_the_gemv_follows_its_stated_order(tmp_path, monkeypatch):
    """The build this CPU runs against native.c's semantics written in float64-free Python:
    per lane, odd then even products fused into the accumulator, denormals as zero, the
    fixed reduction tree (small shapes: it is slow)."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("GPUPOOL_NATIVE_DIR", str(tmp_path))
    lib = native.open_library(native.build())
    if not lib.gp_gemv_features() & 1:
        pytest.skip("this build has no bf16 GEMV (no AVX2 + FMA or AVX-512 BF16)")
    g = torch.Generator().manual_seed(3)
    # rows: 2 (one tile), 9 (tiles of every height); columns: 6 (a partial tile); k = 1536
    # once caught -ffast-math adding the bias into the lanes' sum (an output 1 ulp off)
    for rows, n, k in ((2, 5, 1), (2, 5, 31), (2, 5, 32), (2, 5, 33), (2, 5, 100),
                       (2, 5, 128), (2, 5, 129), (2, 5, 300), (9, 6, 576), (4, 160, 1536)):
        x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
        w = torch.randn(n, k, generator=g).to(torch.bfloat16)
        b = torch.randn(n, generator=g).to(torch.bfloat16)
        got = _gemv(lib, x, w, b)
        want = torch.tensor([[_stated_dot(x[m], w[c], b[c]) for c in range(n)]
                             for m in range(rows)], dtype=torch.bfloat16).view(torch.int16)
        assert torch.equal(got, want), (rows, n, k)
    # and an output where the order shows through the rounding: chunks of +-2^20 that cancel
    # beside small terms (one accumulator's running sum loses other bits than two)
    for _ in range(200):
        x = torch.ones(1, 256, dtype=torch.bfloat16)
        w = torch.randn(1, 256, generator=g).to(torch.bfloat16)
        w.view(1, 8, 32)[:, :, 1::2] = 2.0**20 * torch.tensor([1, -1] * 4).view(1, 8, 1)
        b = torch.zeros(1, dtype=torch.bfloat16)
        one, two = _stated_dot(x[0], w[0], b[0]), _stated_dot(x[0], w[0], b[0], 2)
        if two != one:
            got = _gemv(lib, x, w, b).view(torch.bfloat16)[0, 0].item()
            assert got == one != two
            break
    else:
        raise AssertionError("no case told the orders apart")


def _stated_dot(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor,
                accumulators: int = 1) -> float:
    """native.c's gemv_rows for one output, in float32 torch scalars (normal inputs: no
    denormal occurs, so DAZ/FTZ change nothing; float32 fma = the exact product added once):
    every chunk into one accumulator (``accumulators=2``: chunk c into accumulator c % 2, the
    two added lane-wise: an order the test below shows the kernel does not follow), then the
    lane tree."""
    k = x.shape[0]
    f = torch.float32
    xp = torch.zeros(-(-k // 32) * 32, dtype=f)
    wp = torch.zeros_like(xp)
    xp[:k], wp[:k] = x.to(f), w.to(f)
    acc = torch.zeros(2, 16, dtype=f)
    for c, start in enumerate(range(0, xp.shape[0], 32)):
        pairs_x, pairs_w = xp[start:start + 32].view(16, 2), wp[start:start + 32].view(16, 2)
        a = c % accumulators
        for e in (1, 0):  # odd first
            exact = pairs_x[:, e].double() * pairs_w[:, e].double()  # exact in float32
            acc[a] = (acc[a].double() + exact).to(f)  # one rounding: the fma
    v = acc[0] + acc[1]
    s = v[8:] + v[:8]
    t = s[4:] + s[:4]
    total = (t[0] + t[2]) + (t[1] + t[3])
    return float((total + bias.to(f)).to(torch.bfloat16))


def test_a_failed_build_is_a_warning_with_the_compilers_first_error(tmp_path, monkeypatch,
                                                                    caplog):
    """A target the compiler refuses: no library, and one WARNING naming the target and the
    compiler's own first error line (the probe leaves the process's loaded kernels alone)."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("GPUPOOL_NATIVE_DIR", str(tmp_path))
    monkeypatch.setenv("GPUPOOL_NATIVE_MARCH", "no-such-cpu")
    with caplog.at_level("WARNING", logger="gpupool.kernels.native"):
        assert native._probe() is None
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "-march=no-such-cpu" in record.getMessage()
    assert "error" in record.getMessage() and "no-such-cpu" in record.getMessage()


def test_the_structs_native_py_reads_have_the_compilers_layout(tmp_path):
    """native.py builds its ctypes structs from native.h's text; a C program compiled with
    the same header prints every field's offset and each struct's size: they agree."""
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    lines = ['#include <stdio.h>', '#include <stddef.h>', f'#include "{native.HEADER}"',
             "int main(void) {"]
    want = []
    for name, struct in native.STRUCTS.items():
        lines.append(f'printf("%zu\\n", sizeof({name}));')
        want.append(ctypes.sizeof(struct))
        for field, _ in struct._fields_:
            lines.append(f'printf("%zu\\n", offsetof({name}, {field}));')
            want.append(getattr(struct, field).offset)
    (tmp_path / "layout.c").write_text("\n".join(lines) + "\nreturn 0; }\n")
    subprocess.run([cc, str(tmp_path / "layout.c"), "-o", str(tmp_path / "layout")],
                   check=True, timeout=60)
    got = subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert [int(v) for v in got] == want
    assert len(native.STRUCTS) == 6
    assert native.Step.lora.offset > 0 and native.Step.tp.offset > 0


def test_the_interface_refuses_what_would_corrupt_memory(tmp_path, monkeypatch):
    """A library of another ABI version is not loaded; a struct field that does not exist
    and tensors of the wrong dtype, rank, stride or length never reach C."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("GPUPOOL_NATIVE_DIR", str(tmp_path))
    path = native.build()
    monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION + 1)
    with pytest.raises(RuntimeError, match="ABI version"):
        native.open_library(path)
    with pytest.raises(TypeError, match="no field"):
        native.Lora(startz=0)
    bf = torch.bfloat16
    with pytest.raises(ValueError, match="bfloat16"):
        native.check("x", torch.zeros(2, 8), bf, 2)
    with pytest.raises(ValueError, match="unit stride"):
        native.check("x", torch.zeros(8, 2, dtype=bf).T, bf, 2)
    with pytest.raises(ValueError, match="2-d"):
        native.check("x", torch.zeros(8, dtype=bf), bf, 2)
    with pytest.raises(ValueError, match="weight has 4 values for rows of 8"):
        native.add_rmsnorm(torch.zeros(2, 8, dtype=bf), None, torch.ones(4, dtype=bf), 1e-6)
    i32 = torch.int32
    starts, pages = torch.tensor([0, 2], dtype=i32), torch.tensor([0, 1], dtype=i32)
    memory = torch.zeros(2, 256, dtype=torch.uint8)
    with pytest.raises(ValueError, match="seg_pages must hold 2"):
        native.lora_table(starts, torch.ones(1, dtype=i32), torch.zeros(3, dtype=i32),
                          torch.zeros(1, dtype=i32), memory, 64, 0, [], [])
    with pytest.raises(ValueError, match="outside the memory"):  # a page id past the pages
        native.lora_table(starts, torch.ones(1, dtype=i32), pages, torch.tensor([2], dtype=i32),
                          memory, 64, 0, [], [])
    with pytest.raises(ValueError, match="rank is outside"):
        native.lora_table(starts, torch.tensor([300], dtype=i32), pages,
                          torch.tensor([1], dtype=i32), memory, 64, 0, [], [])
    with pytest.raises(ValueError, match="cannot hold its adapter's pieces"):  # 4 a page
        native.lora_table(starts, torch.tensor([5], dtype=i32), pages,
                          torch.tensor([1], dtype=i32), memory, 64, 0, [], [])
    with pytest.raises(ValueError, match="hold a piece"):
        native.lora_table(starts, torch.ones(1, dtype=i32), pages, torch.tensor([1], dtype=i32),
                          memory, 512, 0, [], [])


INT8_OTHERS = {  # the other build: what the CPU needs to run it besides this CPU's own
    "skylake-avx512": ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512_vnni"),
    "x86-64-v3": ("avx2", "fma", "avx512bw", "avx512dq"),
}


@pytest.mark.parametrize("other", list(INT8_OTHERS))
def test_the_int8_product_gives_the_same_bits_in_every_build(tmp_path, monkeypatch, other):
    """The Skylake build (AVX-512 BW without VNNI: vpmaddwd + vpaddd) and the AVX2 one (the same
    integer sums on 8 lanes, four rows at a time, no tiles) give this CPU's own build's bits
    (VNNI's vpdpwssd; the tiled path past four rows), quantization of x included (tails,
    rows past a block of 2048 columns, extremes, a row with inf, rows near float32's
    smallest), so any of them continues
    another's request exactly."""
    if not all(f in cpu_flags() for f in INT8_OTHERS[other]):
        pytest.skip(f"this CPU cannot run both the {other} build and one with "
                    f"{INT8_OTHERS[other][-1]}")
    if native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("GPUPOOL_NATIVE_DIR", str(tmp_path))
    libs = {march: native.open_library(native.build(march)) for march in (other, "native")}
    assert all(lib.gp_gemv_features() & 2 for lib in libs.values())
    g = torch.Generator().manual_seed(9)
    compared = 0
    for rows in (1, 3, 5, 8, 40):
        for k in (7, 100, 576, 1100, 2100):
            for n in (5, 70):
                x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
                q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
                if k == 2100:  # the largest sums there are, past a block edge
                    q[:2] = -128
                    x[0] = -1.0
                if rows == 5 and k == 100:
                    x[1, 3] = float("inf")
                    x[2] *= 1e-36  # 32767 / amax overflows: a row of zeros in every build
                    x[3] *= 1e-34
                scale = (torch.rand(n, generator=g) * 0.02).to(torch.bfloat16)
                bias = torch.randn(n, generator=g).to(torch.bfloat16) if n == 5 else None
                ys = []
                for lib in libs.values():
                    y = torch.empty(rows, n, dtype=torch.bfloat16)
                    lib.gp_gemv_int8(x.data_ptr(), rows, k, k, q.data_ptr(), n, k,
                                     scale.data_ptr(), None if bias is None else bias.data_ptr(),
                                     y.data_ptr(), n, 2)
                    ys.append(y.view(torch.int16))
                assert torch.equal(*ys), (rows, k, n)
                compared += 1
    assert compared == 50


def _lora_case(k, width, rank, rows, g):
    """One segment of ``rows`` rows on an adapter of ``rank`` targeting group o (one
    projection of ``width`` columns) of one layer, its pieces bf16 in one page: the table
    and the tensors it reads (kept alive by the caller)."""
    piece = 2 * (k + width)  # A's row, then B's transposed row
    memory = torch.zeros(1, piece * rank, dtype=torch.uint8)
    values = memory.view(torch.bfloat16).view(rank, k + width)
    values.copy_((torch.randn(rank, k + width, generator=g) / 8).to(torch.bfloat16))
    values.view(torch.int16)[:, ::13] &= 0x807F  # denormal bf16 in A and B
    i32 = torch.int32
    zeros = [torch.zeros(p, 1, dtype=i32) for p in (3, 1, 2, 1)]
    zeros[1] = torch.full((1, 1), rank, dtype=i32)
    table = native.lora_table(torch.tensor([0, rows], dtype=i32), torch.tensor([rank], dtype=i32),
                              torch.tensor([0, 1], dtype=i32), torch.tensor([0], dtype=i32),
                              memory, piece, 0, [None, (0, 2 * k, [width]), None, None], zeros)
    x = (torch.randn(rows, k, generator=g)).to(torch.bfloat16)
    x.view(torch.int16)[:, ::17] &= 0x807F
    out = (torch.randn(rows, width, generator=g)).to(torch.bfloat16)
    return table, x, out, memory


def test_the_avx2_lora_terms_are_bit_identical_to_the_avx512_ones(both_builds):
    """gp_lora (the attention and MLP groups' adapter terms; the experts' use the same shrink
    and expand): the AVX2 build's shrink sums in the bf16 products' stated order and its
    expand in rank order as the AVX-512 one does, so a request on an adapter moves between
    such workers exactly. Widths and K on both sides of the vector edges, ranks 1 to 16,
    1 to 17 rows, denormal inputs."""
    g = torch.Generator().manual_seed(11)
    compared = 0
    for k, width, rank, rows in ((576, 576, 8, 1), (64, 1536, 16, 5), (100, 75, 3, 17),
                                 (33, 17, 1, 2), (576, 1536, 12, 9)):
        table, x, base, memory = _lora_case(k, width, rank, rows, g)
        outs = {}
        for march, lib in both_builds.items():
            out = base.clone()
            lib.gp_lora(x.data_ptr(), x.stride(0), k, out.data_ptr(), out.stride(0),
                        ctypes.addressof(table), 0, 1, 2)
            outs[march] = out.view(torch.int16)
        assert not torch.equal(outs["native"], base.view(torch.int16))  # terms were added
        assert torch.equal(outs["x86-64-v3"], outs["native"]), (k, width, rank, rows)
        compared += 1
    assert compared == 5


def test_the_experts_call_with_lora_gives_the_same_bits_in_both_builds(both_builds,
                                                                       monkeypatch):
    """native.moe_experts with expert LoRA terms (gp_moe_experts' products, activation and
    each pair's terms) in the AVX2 build and the AVX-512 BF16 one: the same bits."""
    from tests.test_kernels_native import moe_lora_case

    segments = [(2, 5, range(6), range(6)), (1, 0, (), ()), (3, 8, (), range(6)),
                (4, 16, range(6), (1, 3))]
    h, idx, top, table, terms, _ = moe_lora_case(96, 48, 6, 2, 2, 1, segments, seed=3)
    outs = {}
    for march, lib in both_builds.items():
        monkeypatch.setitem(native._STATE, "lib", lib)
        outs[march] = native.moe_experts(h, idx, top, table, None, terms, 1).view(torch.int16)
    assert torch.equal(outs["x86-64-v3"], outs["native"])
