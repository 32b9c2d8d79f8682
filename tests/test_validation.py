"""Bad input to acf_similarity is refused with a ValueError naming the argument (spec §9)."""
import pytest
import torch

from acf_fast import acf_similarity

N, M, K, L, D, H = 3, 4, 5, 6, 16, 4


def good(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(
        V=torch.randn(N, K, D, generator=g),
        v_mask=torch.ones(N, K, dtype=torch.bool),
        W=torch.randn(M, L, D, generator=g),
        w_mask=torch.ones(M, L, dtype=torch.bool),
        heads=H,
        weights={"z_x": torch.randn(D, D, generator=g), "gate": torch.randn(D, generator=g)},
        G=torch.randn(N, D, generator=g),
        backend="torch",
    )
    args.update(over)
    return args


def call(args):
    a = dict(args)
    return acf_similarity(a.pop("V"), a.pop("v_mask"), a.pop("W"), a.pop("w_mask"), **a)


def with_value(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def test_good_input_is_accepted():
    for backend in ("eager", "torch"):
        assert call(good(backend=backend)).shape == (N, M)


BAD = {
    "width mismatch": (lambda: good(W=torch.randn(M, L, D + 4)), r"W has width"),
    "V not 3-D": (lambda: good(V=torch.randn(N, D)), r"V must be 3-D"),
    "W not a tensor": (lambda: good(W=[[0.0]]), r"W must be a torch.Tensor"),
    "integer V": (lambda: good(V=torch.ones(N, K, D, dtype=torch.int64)), r"V must be float"),
    "empty V": (lambda: good(V=torch.randn(0, K, D), v_mask=None, G=None, u2=1.0), r"V is empty"),
    "D % heads": (lambda: good(heads=3), r"not divisible by heads"),
    "heads not positive": (lambda: good(heads=0), r"heads must be a positive int"),
    "NaN in V": (lambda: good(V=with_value(torch.randn(N, K, D), (1, 2, 3), float("nan"))), r"^V contains NaN or Inf"),
    "Inf in W": (lambda: good(W=with_value(torch.randn(M, L, D), (0, 0, 0), float("inf"))), r"^W contains NaN or Inf"),
    "NaN in G": (lambda: good(G=with_value(torch.randn(N, D), (2, 1), float("nan"))), r"^G contains NaN"),
    "Inf in weight": (lambda: good(weights={"z_o": with_value(torch.randn(D, D), (0, 1), float("-inf"))}),
                      r"weights\['z_o'\] contains NaN or Inf"),
    "NaN in global_emb": (lambda: good(G=None, global_emb=(with_value(torch.randn(N, 2), (0, 0), float("nan")), torch.randn(M, 2))),
                          r"global_emb\[0\] \(Gi\) contains NaN"),
    "text without valid token": (lambda: good(w_mask=with_value(torch.ones(M, L, dtype=torch.bool), 2, False)), r"w_mask: text 2 has no valid"),
    "image without valid region": (lambda: good(v_mask=with_value(torch.ones(N, K, dtype=torch.bool), 1, False)), r"v_mask: image 1 has no valid"),
    "mask dtype": (lambda: good(v_mask=torch.ones(N, K, dtype=torch.uint8)), r"v_mask must have dtype torch.bool"),
    "float mask": (lambda: good(w_mask=torch.ones(M, L)), r"w_mask must have dtype torch.bool"),
    "mask shape": (lambda: good(w_mask=torch.ones(M, L + 1, dtype=torch.bool)), r"w_mask must have shape \(4, 6\)"),
    "mixed dtypes": (lambda: good(W=torch.randn(M, L, D, dtype=torch.float64)), r"V is torch.float32 and W is torch.float64"),
    "unknown weight key": (lambda: good(weights={"z_q": torch.randn(D, D)}), r"weights has unknown key 'z_q'"),
    "weight shape": (lambda: good(weights={"x_w": torch.randn(D, D + 1)}), r"weights\['x_w'\] must have shape \(16, 16\)"),
    "gate shape": (lambda: good(weights={"gate": torch.randn(D, D)}), r"weights\['gate'\] must have shape \(16,\)"),
    "weights not a mapping": (lambda: good(weights=[torch.randn(D, D)]), r"weights must be a mapping"),
    "G and global_emb": (lambda: good(global_emb=(torch.randn(N, 2), torch.randn(M, 2))), r"G .*global_emb.*not both"),
    "G shape": (lambda: good(G=torch.randn(N + 1, D)), r"G must be a tensor of shape \(N, D\)"),
    "global_emb rows": (lambda: good(G=None, global_emb=(torch.randn(N, 2), torch.randn(M + 1, 2))), r"global_emb\[1\] \(Gt\) must be a 2-D tensor with 4 rows"),
    "global_emb widths": (lambda: good(G=None, global_emb=(torch.randn(N, 2), torch.randn(M, 3))), r"global_emb widths differ"),
    "global_emb not a pair": (lambda: good(G=None, global_emb=torch.randn(N, 2)), r"global_emb must be a pair"),
    "u2 without a global": (lambda: good(G=None, u2=0.8), r"u2 = 0.8 .*neither G nor global_emb"),
    "scale not a pair": (lambda: good(scale=3.0), r"scale must be a pair"),
    "scale not finite": (lambda: good(scale=(float("nan"), 1.0)), r"scale\[0\] must be finite"),
    "unknown backend": (lambda: good(backend="cuda"), r"backend must be one of"),
}


@pytest.mark.parametrize("backend", ["eager", "torch"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused(case, backend):
    make, pattern = BAD[case]
    args = make()
    if case != "unknown backend":
        args["backend"] = backend
    with pytest.raises(ValueError, match=pattern):
        call(args)
