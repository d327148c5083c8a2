"""Decoding's products on CPU: a few rows (one per sequence of a batch) times every weight matrix, as
one small C kernel that reads each weight row once for all the rows.

A decode step's time is that of reading the weights (540 MB in fp32 for the 135M model). MKL reads
them near the memory bandwidth for one row, but from 2-4 rows on its small-M GEMM is bound by its own
work, not by memory (on 2 Xeon cores: 10 GB/s of weights at 8 rows, against 15 here; in bf16 oneDNN
ran 9.5 GB/s at every size, against 11-17 here). The kernel takes 4 weight rows at a time,
prefetches the next 4, multiplies them by 2 rows of x in 8 accumulators (8 lanes, 16 with AVX-512),
and sums each output in the same order whatever the number of rows: a sequence's logits do not depend
on the sequences beside it. Weights in fp32 or bf16 (widened to fp32 as they are read, once per block
for more than 2 rows); products in fp32, as F.linear accumulates.

The C compiler builds it at first use (under a second, -march=native) into the user cache
($SMOL_CACHE_DIR, else ~/.cache/smollm2), one file per machine and source; without a compiler,
decoding keeps F.linear. Whether it pays is measured on the model itself, in decode steps of each
batch size (choose below, engine.install_gemv), not assumed.
"""
import ctypes
import hashlib
import os
import statistics
import subprocess
import tempfile
import time

import torch

from smollm2 import cpu_paths

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#define VL 16
#else
#define VL 8
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
static inline vf ld_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vf ld_bf16(const uint16_t *p) {  /* bf16 is the top half of an fp32 */
    vh h; memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16; vf v; memcpy(&v, &u, sizeof v); return v;
}
static inline float hsum(vf v) { float s = 0; for (int i = 0; i < VL; i++) s += v[i]; return s; }
#define PF 4 /* rows ahead to prefetch: the next block */
#define PREFETCH(k) if (m == 0) { __builtin_prefetch(r0 + PF * K + k); __builtin_prefetch(r1 + PF * K + k); \
                                  __builtin_prefetch(r2 + PF * K + k); __builtin_prefetch(r3 + PF * K + k); }
/* rows r0..r3 of w times rows m0.. of x, into y's columns n..n+3 */
#define BLOCK(T, LD, q0, q1, q2, q3)                                                                   \
        int64_t m = 0;                                                                                 \
        for (; m + 2 <= M; m += 2) {                                                                   \
            const float *a = x + m * K, *b = a + K;                                                    \
            vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};         \
            for (int64_t k = 0; k < K; k += VL) {                                                      \
                vf w0 = LD(q0 + k), w1 = LD(q1 + k), w2 = LD(q2 + k), w3 = LD(q3 + k);                \
                PREFETCH(k)                                                                            \
                vf xa = ld_f32(a + k), xb = ld_f32(b + k);                                             \
                a0 += w0 * xa; a1 += w1 * xa; a2 += w2 * xa; a3 += w3 * xa;                            \
                b0 += w0 * xb; b1 += w1 * xb; b2 += w2 * xb; b3 += w3 * xb;                            \
            }                                                                                          \
            float *ya = y + m * N + n, *yb = ya + N;                                                   \
            ya[0] = hsum(a0); ya[1] = hsum(a1); ya[2] = hsum(a2); ya[3] = hsum(a3);                    \
            yb[0] = hsum(b0); yb[1] = hsum(b1); yb[2] = hsum(b2); yb[3] = hsum(b3);                    \
        }                                                                                              \
        for (; m < M; m++) {                                                                           \
            const float *a = x + m * K;                                                                \
            vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                                 \
            for (int64_t k = 0; k < K; k += VL) {                                                      \
                PREFETCH(k)                                                                            \
                vf xa = ld_f32(a + k);                                                                 \
                a0 += LD(q0 + k) * xa; a1 += LD(q1 + k) * xa; a2 += LD(q2 + k) * xa; a3 += LD(q3 + k) * xa; \
            }                                                                                          \
            float *ya = y + m * N + n;                                                                 \
            ya[0] = hsum(a0); ya[1] = hsum(a1); ya[2] = hsum(a2); ya[3] = hsum(a3);                    \
        }

/* y (M, N) = x (M, K) @ w (N, K)^T for N a multiple of 4 and K of 16 */
void gemv_f32(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n += 4) {
        const float *r0 = w + n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
        BLOCK(float, ld_f32, r0, r1, r2, r3)
    }
}
/* bf16 weights: for more than 2 rows of x, each block of 4 weight rows is widened once into fp32 */
void gemv_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float wide[4 * K];
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n += 4) {
            const uint16_t *r0 = w + n * K, *r1 = r0 + K, *r2 = r1 + K, *r3 = r2 + K;
            if (M <= 2) {
                BLOCK(uint16_t, ld_bf16, r0, r1, r2, r3)
            } else {
                for (int64_t k = 0; k < 4 * K; k += VL) {
                    __builtin_prefetch(r0 + PF * K + k);
                    vf v = ld_bf16(r0 + k); memcpy(wide + k, &v, sizeof v);
                }
                const float *f0 = wide, *f1 = f0 + K, *f2 = f1 + K, *f3 = f2 + K;
                BLOCK(float, ld_f32, f0, f1, f2, f3)
            }
        }
    }
}
"""
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-shared", "-fPIC"]
MAX_ROWS = 8  # rows of x the kernel takes (tokens of a pass); longer prompt passes keep F.linear
LIBRARY = {}  # "lib": the loaded kernels, or None; "error": why not


def build(cc=None, cache_dir=None):
    """The compiled kernels (a ctypes library), built once per machine and source, or None (and
    LIBRARY["error"] says why): no compiler, or it failed. OpenMP where the compiler has it: the
    library then shares torch's libgomp (the same soname, loaded already), not a second runtime."""
    if "lib" in LIBRARY:
        return LIBRARY["lib"]
    cc = cc or os.environ.get("CC") or "cc"
    digest = hashlib.sha256(f"{SOURCE}{FLAGS}{cc}{cpu_paths.machine_key()}".encode()).hexdigest()[:16]
    LIBRARY["digest"] = digest  # engine.install_gemv's figures are this build's
    folder = cache_dir or os.path.dirname(cpu_paths.cache_path())
    path = os.path.join(folder, f"gemv-{digest}.so")
    lib, error = None, None
    try:
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            compile_to(cc, path)
        lib = ctypes.CDLL(path)
        for fn in (lib.gemv_f32, lib.gemv_bf16):
            fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
            fn.restype = None
    except (OSError, subprocess.SubprocessError) as e:
        error = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        lib = None
    LIBRARY.update(lib=lib, error=error)
    return lib


def compile_to(cc, path):
    """Compile SOURCE into path, atomically (with OpenMP, else without: Apple's clang has none)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "gemv.c"), f"{path}.{os.getpid()}.tmp"
        with open(src, "w") as f:
            f.write(SOURCE)
        for openmp in (["-fopenmp"], []):
            done = subprocess.run([cc, *FLAGS, *openmp, src, "-o", out], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.replace(out, path)
                return
        raise OSError(f"{cc} could not build the decode kernel: {done.stderr.strip() or done.returncode}")


def fits(x, weight):
    """Whether the kernel computes x @ weight.T: CPU, inference (no autograd), at most MAX_ROWS rows,
    fp32 or bf16 weights of 4k rows and 16k columns."""
    return (x.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and x.dtype == weight.dtype
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and x.shape[:-1].numel() <= MAX_ROWS and weight.size(0) % 4 == 0 and weight.size(1) % 16 == 0
            and weight.is_contiguous() and not torch.compiler.is_compiling())


def linear(x, weight, lib=None):
    """x @ weight.T through the kernel (fits(x, weight) must hold), in x's dtype."""
    lib = lib or LIBRARY["lib"]
    rows = x.reshape(-1, x.size(-1)).float().contiguous()  # (M, K) in fp32
    y = torch.empty(rows.size(0), weight.size(0))
    fn = lib.gemv_f32 if weight.dtype == torch.float32 else lib.gemv_bf16
    fn(rows.data_ptr(), weight.data_ptr(), y.data_ptr(), rows.size(0), weight.size(0), weight.size(1),
       torch.get_num_threads())
    return y.to(x.dtype).view(*x.shape[:-1], weight.size(0))


MARGIN = 1.05  # the kernel must be this much faster: F.linear is torch's own path, and a timing is noisy


def choose(step, key, sizes=(1, 2, 4, 8), reps=8, path=None, clock=time.perf_counter):
    """(figures, rows): figures {rows: [seconds with F.linear, seconds with the kernel]}, the medians of
    `reps` decode steps of the model at each batch size (step(rows, kernel) runs one), the two in turns
    so that a busy machine slows both alike, cached per machine and key; rows, the batch sizes at
    which the kernel was at least MARGIN times faster."""
    path = path or cpu_paths.cache_path()
    figures = cpu_paths.read_cache(path).get(key)
    if not figures:
        figures = {}
        for n in sizes:
            step(n, False), step(n, True)  # first calls: set-up
            pairs = []
            for _ in range(reps):
                t0 = clock()
                step(n, False)
                t1 = clock()
                step(n, True)
                pairs.append((t1 - t0, clock() - t1))
            figures[str(n)] = [statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)]
        cpu_paths.write_cache(path, key, figures)
    return figures, {int(n) for n, (torch_s, kernel_s) in figures.items() if torch_s >= MARGIN * kernel_s}
