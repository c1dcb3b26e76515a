"""The packed binary GEMM alone against torch.mm float32, measured in the same run.

    python benchmarks/bench_gemm.py [--isa avx2] [--runs 7] [--threads N] [--quick]

Shapes: DeiT-S's FFN (3152 x 384 signs by 384 x 1536 signs, i.e. fc1 of batch 16 at 224x224)
and BinaryViT's stage 1 (K = 64: 16 * 3136 x 64 by 64 x 512). Each line prints the median of
``--runs`` timed runs of the packed product (operands prepacked: the GEMM alone) and of
``torch.mm`` on float32 signs, the GMAC/s of both, their ratio, and the packed kernel's fraction
of its instruction set's limit:

    limit GMAC/s = threads x clock (GHz, /proc/cpuinfo's 'cpu MHz') x bit-MACs per cycle per core

with bit-MACs per cycle: avx512_vpopcntdq 512 (one VPOPCNTQ of a 512-bit vector per cycle, the
throughput of Intel's port 5 and of Zen 4), avx2 128 (the vpshufb nibble popcount of a 256-bit
vector costs about 8 vector instructions: xor, shift, 2 and, 2 vpshufb, 2 byte adds; 4 vector
ALUs retire that in about 2 cycles), portable 64 (one scalar POPCNT per cycle). The xor and the
accumulating add are not counted, so no kernel can reach 1.0. A float32 core does 2 FMA
vectors per cycle: 32 MACs with AVX-512, 16 with AVX2; so the ideal ratio is 16x (AVX-512) and
8x (AVX2 on an AVX2-only machine, about 9x in the issue's own estimate).
"""
import argparse
import os
import statistics
import sys
import time

import torch

from timm_binaryvit import kernels, packed_ops

SHAPES = {
    'deit_s_ffn_fc1': (3152, 384, 1536),
    'deit_s_ffn_fc2': (3152, 1536, 384),
    'binaryvit_stage1': (16 * 3136, 64, 512),
}
BIT_MACS_PER_CYCLE = {'avx512_vpopcntdq': 512, 'avx2': 128, 'portable': 64}


def clock_ghz() -> float:
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('cpu MHz'):
                    return float(line.split(':')[1]) / 1000
    except (OSError, ValueError):
        pass
    return float('nan')


def median_time(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def signs(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (rows, cols), generator=g).float().mul_(2).sub_(1)


def bench(name: str, shape, runs: int, limit_per_s: float):
    M, K, N = shape
    a, b = signs(M, K, 0), signs(N, K, 1)
    pa, pb = packed_ops.pack_signs(a), packed_ops.pack_signs(b)
    bt = b.t().contiguous()
    out_f = torch.empty(M, N)
    out_i = torch.empty(M, N, dtype=torch.int32)
    # exactness on the benchmark shape itself (cheap next to the timing)
    got = packed_ops.sign_gemm(pa, pb, out=out_i)
    ref = torch.mm(a, bt, out=out_f)
    if not torch.equal(got.float(), ref):
        sys.exit(f'{name}: packed result differs from torch.mm')
    t_float = median_time(lambda: torch.mm(a, bt, out=out_f), runs)
    t_packed = median_time(lambda: packed_ops.sign_gemm(pa, pb, out=out_i), runs)
    scale, bias = torch.rand(N), torch.randn(N)
    out_e = torch.empty(M, N)
    shift = torch.zeros(K)
    x = torch.randn(M, K)
    t_epi = median_time(lambda: packed_ops.sign_gemm(pa, pb, scale, bias, out=out_e), runs)
    t_full = median_time(
        lambda: packed_ops.sign_gemm(packed_ops.pack_signs(x, shift), pb, scale, bias, out=out_e), runs)
    macs = M * K * N
    g_packed, g_float = macs / t_packed / 1e9, macs / t_float / 1e9
    print(f'{name:<17} {M}x{K} by {K}x{N}: float32 mm {t_float * 1e3:8.2f} ms ({g_float:7.1f} GMAC/s) | '
          f'packed {t_packed * 1e3:7.2f} ms ({g_packed:7.1f} GMAC/s) = {t_float / t_packed:5.2f}x float32, '
          f'{g_packed * 1e9 / limit_per_s:.2f} of the limit | + scale/bias epilogue {t_float / t_epi:5.2f}x | '
          f'+ activation packing {t_float / t_full:5.2f}x')
    return t_float / t_packed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--isa', choices=packed_ops.ISAS, default=None, help='force one kernel path')
    parser.add_argument('--runs', type=int, default=7, help='timed runs per measurement (median), at least 5')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch.set_num_threads for both sides (1 is steadier on a shared machine)')
    parser.add_argument('--quick', action='store_true', help='smaller row counts (a smoke test, not the goal)')
    args = parser.parse_args(argv)
    if not packed_ops.available():
        sys.exit(f'packed kernels unavailable: {packed_ops.unavailable_reason()}')
    runs = max(5, args.runs)
    if args.threads:
        torch.set_num_threads(args.threads)
    with packed_ops.use_isa(args.isa):
        path = packed_ops.isa()
        threads = torch.get_num_threads()
        ghz = clock_ghz()
        limit = threads * ghz * 1e9 * BIT_MACS_PER_CYCLE[path]
        print(f'machine: {kernels.describe_machine()}')
        print(f'packed path: {path} (supported: {", ".join(packed_ops.supported_isas())}); limit = {threads} threads '
              f'x {ghz:.2f} GHz x {BIT_MACS_PER_CYCLE[path]} bit-MACs/cycle = {limit / 1e9:.0f} GMAC/s; '
              f'median of {runs} runs')
        ratios = {}
        for name, shape in SHAPES.items():
            if args.quick:
                shape = (min(shape[0], 512),) + shape[1:]
            ratios[name] = bench(name, shape, runs, limit)
        goal = ratios['deit_s_ffn_fc1']
        print(f'goal (>= 5x float32 at DeiT-S FFN fc1): {goal:.2f}x -> {"met" if goal >= 5 else "NOT met"}')


if __name__ == '__main__':
    main()
