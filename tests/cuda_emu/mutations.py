"""Mutation check of the emulated CUDA tests: each bug below is injected into a temporary copy of
csrc/ (never into the tree), the emulated tests of that kernel family run against the copy
(ALTEROPS_CUDA_EMU_CSRC), and the suite must fail on it, by an assertion or a check of the
executor, not by a compile error.

    python tests/cuda_emu/mutations.py            # all mutations (several minutes)
    python tests/cuda_emu/mutations.py 3 7        # some of them, by number
    python tests/cuda_emu/mutations.py --list

Prints, per mutation, the first failing test and the start of its message; exits non-zero if any
mutation survives or does not compile.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BLUR = "blur/blur_cuda.cu"
STATS = "statistics/statistics_cuda.cu"
NA = "neighborhood_attention/neighborhood_attention_cuda.cu"
WA = "window_attention/window_attention_cuda.cu"
TESTS = {BLUR: "tests/test_cuda_emulated_blur.py", STATS: "tests/test_cuda_emulated_statistics.py",
         NA: "tests/test_cuda_emulated_neighborhood_attention.py", WA: "tests/test_cuda_emulated_window_attention.py"}

# (kind, file, description, old text (must occur exactly once), new text)
MUTATIONS = [
    ("indexing", BLUR, "forward: output column off by one",
     "const int ow = int(idx % g.Wo);", "const int ow = int((idx + 1) % g.Wo);"),
    ("indexing", BLUR, "reflect padding off by one (symmetric instead of reflect)",
     "return p < 0 ? -p : 2 * (n - 1) - p;", "return p < 0 ? -p - 1 : 2 * (n - 1) - p;"),
    ("indexing", BLUR, "backward: first covering output rounds down",
     "lo = first <= 0 ? 0 : (first + s - 1) / s;", "lo = first <= 0 ? 0 : first / s;"),
    ("bounds", BLUR, "backward: last covering output clamped one too far (reads past grad_out)",
     "if (hi > n_out - 1) hi = n_out - 1;", "if (hi > n_out) hi = n_out;"),
    ("grid", BLUR, "grid rounds down (the tail of the outputs is never written)",
     "int64_t blocks = (total + kThreads - 1) / kThreads;", "int64_t blocks = total / kThreads;"),
    ("indexing", BLUR, "backward: right/bottom border candidate off by one",
     "const int c = tc == 0 ? w + g.pl : (tc <= g.pl ? tc - 1 : g.W + tc - 1);",
     "const int c = tc == 0 ? w + g.pl : (tc <= g.pl ? tc - 1 : g.W + tc - 2);"),
    ("bounds", BLUR, "forward: zero-padding test dropped on the column (reads x[-1], x[W])",
     "        if (c < 0) continue;\n", ""),
    ("math", BLUR, "relu dropped from the forward pointwise op",
     "if (ACT == 2) t = ", "if (ACT == 3) t = "),
    ("barrier", STATS, "delta: __syncwarp between staging a chunk and reading it removed",
     "      for (int i = lane; i < count; i += 32) buf[i] = to_acc<T, Acc>(src[i]);\n      __syncwarp();",
     "      for (int i = lane; i < count; i += 32) buf[i] = to_acc<T, Acc>(src[i]);"),
    ("barrier", STATS, "delta: __syncthreads after the cos/sin table removed",
     "  for (int k = lane; k < K; k += 32) lacc[k] = Acc(0);\n  __syncthreads();",
     "  for (int k = lane; k < K; k += 32) lacc[k] = Acc(0);"),
    ("barrier", STATS, "variance finalize: __syncthreads in the tree reduction removed",
     "    if (static_cast<int>(threadIdx.x) < width) sums[threadIdx.x] += sums[threadIdx.x + width];\n"
     "    __syncthreads();",
     "    if (static_cast<int>(threadIdx.x) < width) sums[threadIdx.x] += sums[threadIdx.x + width];"),
    ("barrier", STATS, "variance: __syncthreads moved into the lane-0 branch (divergent barrier)",
     "  if (lane == 0) warp_sums[warp] = warp_total;\n  __syncthreads();",
     "  if (lane == 0) {\n    warp_sums[warp] = warp_total;\n    __syncthreads();\n  }"),
    ("mask", STATS, "variance: shuffle mask of half a warp",
     "s1 += __shfl_xor_sync(0xffffffffu, s1, off);", "s1 += __shfl_xor_sync(0x0000ffffu, s1, off);"),
    ("mask", STATS, "variance: shuffle mask missing lane 31",
     "s2 += __shfl_xor_sync(0xffffffffu, s2, off);", "s2 += __shfl_xor_sync(0x7fffffffu, s2, off);"),
    ("shared size", STATS, "delta: dynamic shared memory sized without the per-warp bin sums",
     "kWarps * (Cap<Acc>::value + nmax + kmax));", "kWarps * (Cap<Acc>::value + nmax));"),
    ("shared size", STATS, "delta: dynamic shared memory above 48 KiB without opting in (launch refused)",
     "sizeof(Acc) * static_cast<size_t>(2 * nmax + kWarps", "sizeof(Acc) * static_cast<size_t>(5 * nmax + kWarps"),
    ("reduction", STATS, "variance: butterfly reduction stops at offset 8 (lanes 16-31 never added)",
     "for (int off = 16; off > 0; off /= 2) {", "for (int off = 8; off > 0; off /= 2) {"),
    ("reduction", STATS, "variance finalize: one partial past the segment's end",
     "for (int64_t b = threadIdx.x; b < blocks; b += kThreads)",
     "for (int64_t b = threadIdx.x; b <= blocks; b += kThreads)"),
    ("indexing", STATS, "delta finalize: DC partial read at the wrong stride",
     "sum_0 += partials[sg.part_offset + b * K];", "sum_0 += partials[sg.part_offset + b];"),
    ("indexing", STATS, "segment_of: a block at a segment's first block goes to the previous segment",
     "while (si + 1 < segs.count && b >= segs.seg[si + 1].first_block) ++si;",
     "while (si + 1 < segs.count && b > segs.seg[si + 1].first_block) ++si;"),
    ("reduction", STATS, "delta: anti-diagonal sums not reset between planes",
     "    for (int s = lane; s < n; s += 32) a[s] = Acc(0);\n", ""),
    ("indexing", STATS, "delta: anti-diagonal column starts one off",
     "int col = s - y0 % n;", "int col = s + 1 - y0 % n;"),
    # neighborhood attention
    ("indexing", NA, "clamp window: inward shift at the map's end one too far",
     "if (leader + right >= Lg) start += Lg - right - leader - 1;",
     "if (leader + right >= Lg) start += Lg - right - leader;"),
    ("indexing", NA, "dk/dv: query range search stops before a window starting at the tile's last key",
     "    if (s <= k1) {", "    if (s < k1) {"),
    ("indexing", NA, "dk/dv: bias cell of the query taken with the slot multipliers",
     "bq += unsigned(gq - c.ax[a].K + 1) * unsigned(c.bm[a]);",
     "bq += unsigned(gq - c.ax[a].K + 1) * unsigned(c.sm[a]);"),
    ("barrier", NA, "tile loop: __syncthreads between staging a tile and computing on it removed",
     "    __syncthreads();\n    compute(j);", "    compute(j);"),
    ("barrier", NA, "dk/dv: __syncthreads between the query-range search (sRange) and its reads removed",
     "    ptx::cp_async_wait<0>();\n  }\n  __syncthreads();\n  int qlo[3]",
     "    ptx::cp_async_wait<0>();\n  }\n  int qlo[3]"),
    ("barrier", NA, "bias gradient: __syncthreads between the per-warp sums and their total removed",
     "  if (lane == 0) red[warp] = acc;\n  __syncthreads();", "  if (lane == 0) red[warp] = acc;"),
    ("mask", NA, "quad row sum: shuffle mask of half a warp",
     "  v += __shfl_xor_sync(kFull, v, 1);", "  v += __shfl_xor_sync(0x0000ffffu, v, 1);"),
    ("shared size", NA, "dk/dv: dynamic shared memory sized for 8 ints of query info instead of 9",
     "STAGES * 9 * KTM * sizeof(int)", "STAGES * 8 * KTM * sizeof(int)"),
    ("tc pipeline", NA, "tile loop: cp_async_wait<2> while a tile is in flight (the current one not waited for)",
     "        ptx::cp_async_wait<1>();", "        ptx::cp_async_wait<2>();"),
    ("tc pipeline", NA, "mma_nt: B fragments of the two n8 tiles mixed (ldmatrix x4 registers 1 and 2 swapped)",
     "const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};\n        mma16816<T>(acc[2 * j], af, b0);",
     "const uint32_t b0[2] = {bf[0], bf[2]}, b1[2] = {bf[1], bf[3]};\n        mma16816<T>(acc[2 * j], af, b0);"),
    ("reduction", NA, "forward: online-softmax rescale of the output accumulators dropped",
     "        o[n][2 * i] *= alpha;\n        o[n][2 * i + 1] *= alpha;\n", ""),
    ("reduction", NA, "bias gradient: a shared table sums only the first head",
     "const int64_t count = int64_t(c.B) * nh * W;", "const int64_t count = int64_t(c.B) * W;"),
    # window attention
    ("indexing", WA, "shift region boundary one row late (r > Hp - sh)",
     "int(g.sh > 0 && r >= g.Hp - g.sh)", "int(g.sh > 0 && r > g.Hp - g.sh)"),
    ("indexing", WA, "bias cell: query minus key instead of key minus query",
     "return (kc & 0xffff) - (qc & 0xffff) + center;", "return (qc & 0xffff) - (kc & 0xffff) + center;"),
    ("indexing", WA, "bias partials: a key wrapping to the next window row counted (kx <= ww)",
     "if (kx >= 0 && kx < g.ww) a += ds", "if (kx >= 0 && kx <= g.ww) a += ds"),
    ("barrier", WA, "SIMT forward: __syncthreads between staging K / V and reading them removed",
     "    load_rows_f32(Vs, LD, 32 * C, v, sv, p.b, p.h, k0, tok, ty, tx, g.N, g.d);\n    __syncthreads();\n"
     "    const int kc = code_of(tok, k0 + lane, g.N);\n    float s[kSimtRows];",
     "    load_rows_f32(Vs, LD, 32 * C, v, sv, p.b, p.h, k0, tok, ty, tx, g.N, g.d);\n"
     "    const int kc = code_of(tok, k0 + lane, g.N);\n    float s[kSimtRows];"),
    ("barrier", WA, "SIMT dq: __syncthreads before the bias partials read every warp's dS removed",
     "      __syncthreads();  // every warp's dS rows are in place\n      bias_partials(bacc, DS, kSimtChunk",
     "      bias_partials(bacc, DS, kSimtChunk"),
    ("mma by part of a warp", WA, "tensor-core forward: 'active' per lane (its row exists) instead of per warp",
     "const bool active = q0 + warp * 16 < g.N;  // the warp has rows in the window",
     "const bool active = ja < g.N;  // the warp has rows in the window"),
    ("mask", WA, "warp_max: shuffle mask of half a warp",
     "v = fmaxf(v, __shfl_xor_sync(kFull, v, o));", "v = fmaxf(v, __shfl_xor_sync(0x0000ffffu, v, o));"),
    ("shared size", WA, "tensor-core forward launched with one stage's shared memory (the kernel uses two)",
     "const size_t smem = tc_plan(kForward, DMAX, g.T, g.N, nc > 1 ? 2 : 1).base.total;",
     "const size_t smem = tc_plan(kForward, DMAX, g.T, g.N, 1).base.total;"),
    ("tc pipeline", WA, "tensor-core forward: cp_async_wait<2> (the current chunk not waited for)",
     "keeps wait<1> right\n    ptx::cp_async_wait<1>();", "keeps wait<1> right\n    ptx::cp_async_wait<2>();"),
    ("tc pipeline", WA, "ldmatrix A fragment: lanes 8-15 address columns 8-15 (x4 matrix order wrong)",
     "return t + (r0 + (lane & 15)) * LD + c0 + ((lane >> 4) << 3);",
     "return t + (r0 + (lane & 15)) * LD + c0 + (((lane >> 3) & 1) << 3);"),
    ("tc pipeline", WA, "mma_pb: A fragment registers 1 and 2 swapped (rows g+8 / columns 8-15)",
     "Mma<T>::pack(pf[2 * kk][0], pf[2 * kk][1]), Mma<T>::pack(pf[2 * kk][2], pf[2 * kk][3]),\n"
     "                           Mma<T>::pack(pf[2 * kk + 1][0], pf[2 * kk + 1][1]),",
     "Mma<T>::pack(pf[2 * kk][0], pf[2 * kk][1]), Mma<T>::pack(pf[2 * kk + 1][0], pf[2 * kk + 1][1]),\n"
     "                           Mma<T>::pack(pf[2 * kk][2], pf[2 * kk][3]),"),
    ("reduction", WA, "bias table gradient: the last partial of each table head dropped",
     "for (int64_t p = grp; p < per; p += 8)", "for (int64_t p = grp; p < per - 1; p += 8)"),
    ("reduction", WA, "SIMT forward: online-softmax rescale of the value sums dropped",
     "      for (int c = 0; c < C; ++c) acc[i][c] *= alpha;\n", ""),
]


def run_one(i: int, timeout: int = 1200) -> tuple[bool, str]:
    kind, rel, what, old, new = MUTATIONS[i]
    tmp = tempfile.mkdtemp(prefix="alterops-mutant-")
    try:
        csrc = os.path.join(tmp, "csrc")
        shutil.copytree(os.path.join(ROOT, "csrc"), csrc)
        path = os.path.join(csrc, rel)
        with open(path) as fh:
            text = fh.read()
        n = text.count(old)
        if n != 1:
            return False, f"the text to mutate occurs {n} times in {rel} (the kernel changed?)"
        with open(path, "w") as fh:
            fh.write(text.replace(old, new))
        env = dict(os.environ, ALTEROPS_CUDA_EMU_CSRC=csrc, COLUMNS="300")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE",
                               TESTS[rel]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        if "for the CUDA emulator failed" in out:
            return False, "does not compile:\n" + out[-3000:]
        if proc.returncode == 0:
            return False, "SURVIVED: the emulated tests pass"
        m = re.search(r"^(FAILED|ERROR) (\S+)", out, re.M)
        if not m:
            return False, f"pytest exited {proc.returncode} without a failing test:\n{out[-3000:]}"
        e = re.findall(r"^E\s+(\S.*)$", out, re.M)[:2]  # the start of the assertion message
        return True, f"{m.group(2).split('::', 1)[1]}: {' | '.join(e)[:400]}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    if "--list" in argv:
        for i, (kind, rel, what, _, _) in enumerate(MUTATIONS):
            print(f"{i:2d} [{kind}] {rel}: {what}")
        return 0
    which = [int(a) for a in argv] or list(range(len(MUTATIONS)))
    bad = 0
    for i in which:
        kind, rel, what, _, _ = MUTATIONS[i]
        t0 = time.time()
        caught, msg = run_one(i)
        bad += not caught
        print(f"{i:2d} [{kind}] {os.path.basename(rel)}: {what}\n   {'caught' if caught else 'NOT CAUGHT'} "
              f"({time.time() - t0:.0f} s) by {msg}", flush=True)
    print(f"{len(which) - bad} of {len(which)} mutations caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
