"""Device probe: ceilings (bf16 matmul, copy) and tl.dot precision on this GPU."""
import json, os, sys, time
import torch, triton, triton.language as tl
from triton.testing import do_bench
out = {}
dev = "cuda"
out["device"] = torch.cuda.get_device_name(); out["torch"] = torch.__version__; out["triton"] = triton.__version__
p = torch.cuda.get_device_properties(0); out["sms"] = p.multi_processor_count
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16); b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
t = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
out["bf16_matmul_tflops"] = 2 * 8192**3 / (t * 1e-3) / 1e12
x = torch.randn(2**30, device=dev, dtype=torch.float32)
y = torch.empty_like(x)
t = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
out["copy_tbps"] = 2 * x.numel() * 4 / (t * 1e-3) / 1e12
del a, b, x, y

@triton.jit
def mm(a_ptr, b_ptr, c_ptr, N: tl.constexpr, PREC: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r[:, None] * N + r[None, :])
    b = tl.load(b_ptr + r[:, None] * N + r[None, :])
    tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b, input_precision=PREC))
for n in (64, 128):
    A = torch.randn(n, n, device=dev); B = torch.randn(n, n, device=dev)
    ref = (A.double() @ B.double())
    for prec in ("ieee", "tf32", "tf32x3"):
        C = torch.full((n, n), float("nan"), device=dev)
        try:
            mm[(1,)](A, B, C, n, prec)
            err = float((C.double() - ref).norm() / ref.norm())
            out[f"dot_{prec}_{n}_relerr"] = err
        except Exception as e:
            out[f"dot_{prec}_{n}_relerr"] = f"{type(e).__name__}: {e}"[:300]
print(json.dumps(out, indent=1))
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "probe.json"), "w"), indent=1)
