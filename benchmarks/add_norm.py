"""The decoder's residual add + LayerNorm at baby shapes (12 x 64 rows of 128), compiled forward + backward,
interleaved, process CPU time per call: `unfused` is x + y then the LayerNorm kernel (before issue #23's
fused kernel), `fused` the add_layer_norm kernel, `ops` MLX's own add and mx.fast.layer_norm.

    OPENBLAS_NUM_THREADS=1 TWINLM_KERNEL_THREADS=1 python -m benchmarks.add_norm [rows] [rounds]
"""

import statistics
import sys
import time

import numpy as np

from twinlm.backends import mlx as mb

mx = mb.mx
B, OFF = mb.MLXBackend(), mb.MLXBackend(kernels=False)
K = B.kernels
if K is None or not hasattr(K, "add_layer_norm"):
    sys.exit("error: the kernels are not built: python -m twinlm.backends.kernels.build")
rows, c = int(sys.argv[1]) if len(sys.argv) > 1 else 768, 128
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
rng = np.random.default_rng(0)
x, y, gs, gn = (mx.array(rng.standard_normal((rows, c)).astype(np.float32)) for _ in range(4))
w, b = (mx.array(rng.standard_normal(c).astype(np.float32)) for _ in range(2))


def unfused(x, y, w, b):
    s = x + y
    return s, K.layer_norm(s, w, b, 1e-5)


def fused(x, y, w, b):
    return K.add_layer_norm(x, y, w, b, 1e-5)


def ops(x, y, w, b):
    return OFF.add_layer_norm(x, y, w, b)


def make(f):
    def both(x, y, w, b):
        out, g = mx.vjp(lambda *a: list(f(*a)), [x, y, w, b], [gs, gn])
        return out + g
    return mx.compile(both)


fns = {k: make(f) for k, f in (("unfused", unfused), ("fused", fused), ("ops", ops))}
for f in fns.values():
    mx.eval(f(x, y, w, b))
inner = 200
res = {k: [] for k in fns}
for _ in range(rounds):
    for k, f in fns.items():
        t0 = time.process_time()
        for _ in range(inner):
            mx.eval(f(x, y, w, b))
        res[k].append((time.process_time() - t0) / inner * 1e6)
for k, v in res.items():
    print(f"{k:8s} fwd+bwd median {statistics.median(v):8.1f} us CPU (min {min(v):.1f})")
