"""Probe: cuDNN's ragged (varlen) fused attention, aten._cudnn_attention_forward with cum_seq_q / cum_seq_k, against
torch's FA2 varlen at the trainer's packed shapes: output / logsumexp shapes, agreement, forward + backward time."""
import sys
import time

import torch

torch.manual_seed(0)
dev = "cuda"


def fa2(q, k, v, cu, mx):
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, mx, mx, 0.0, False, False)[0]
    return out


def cudnn(q, k, v, cu, mx):
    res = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, mx, mx, True, 0.0, False, False)
    return res


def timeit(fn, n=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


for name, lengths, heads in [("GF104M 32x2048", [2048] * 32, 12), ("GF104M mixed", [2048] * 31 + [2009], 12),
                             ("GF316M 32x2048", [2048] * 32, 18), ("ESM2-650M mixed", [1024, 300, 700, 1024] * 8, 20)]:
    try:
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        cu = cu.to(dev)
        T, mx = sum(lengths), max(lengths)
        q, k, v = (torch.randn(T, heads, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        res = cudnn(q, k, v, cu, mx)
        print(name, "cudnn out", tuple(res[0].shape), res[0].stride(), "lse", tuple(res[1].shape), res[1].stride(),
              "seed", res[6].shape, res[6].dtype, "offset", res[7].shape, flush=True)
        ref = fa2(q, k, v, cu, mx)
        print("  max |cudnn - fa2|", (res[0].float() - ref.float()).abs().max().item(), flush=True)
        g = torch.randn_like(ref)
        gq1, gk1, gv1 = torch.autograd.grad(res[0], (q, k, v), g)
        from torch.nn.attention.varlen import varlen_attn
        ref2 = varlen_attn(q, k, v, cu, cu, mx, mx)
        gq2, gk2, gv2 = torch.autograd.grad(ref2, (q, k, v), g)
        print("  grad max diff q/k/v", [(a.float() - b.float()).abs().max().item() for a, b in
                                        ((gq1, gq2), (gk1, gk2), (gv1, gv2))], "grad scale", gq2.abs().max().item())
        f_c = timeit(lambda: cudnn(q, k, v, cu, mx))
        f_f = timeit(lambda: varlen_attn(q, k, v, cu, cu, mx, mx))
        fb_c = timeit(lambda: torch.autograd.grad(cudnn(q, k, v, cu, mx)[0], (q, k, v), g))
        fb_f = timeit(lambda: torch.autograd.grad(varlen_attn(q, k, v, cu, cu, mx, mx), (q, k, v), g))
        print(f"  fwd ms cudnn {f_c:.2f} fa2 {f_f:.2f}; fwd+bwd ms cudnn {fb_c:.2f} fa2 {fb_f:.2f}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(name, "FAILED", type(e).__name__, str(e)[:400], flush=True)
print(torch.__version__, torch.backends.cudnn.version(), file=sys.stderr)
