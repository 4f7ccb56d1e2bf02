"""Rounding error of the 3x3 convolution's Winograd F(4x4, 3x3) algorithm (the one nvp's
CPU kernels use) when its transformed operands are held in bf16 -- what a bf16 product
kernel (AVX512-BF16's VDPBF16PS, or AMX) would do -- against f32, and against the direct
convolution on bf16-rounded inputs and weights (what PyTorch's CPU autocast computes).

Everything is evaluated in float64 with the named roundings applied, on post-ReLU-like
inputs and weights scaled as nvp initialises them; the error is relative to the exact
(float64) direct convolution: (norm of the difference / norm of the result, largest
absolute difference / largest absolute value).

    python scripts/winograd_precision.py      # needs torch; not run in CI

Measured in session 12 (torch 2.15.0): F(4,3) with f32 operands 3.4e-7 / 8.8e-7; with bf16
operands 2.2e-2 / 6.7e-2; direct convolution on bf16 inputs 2.4e-3 / 2.4e-3 (64 channels;
128 give the same to two digits).
"""
import torch

# F(4x4, 3x3) (Lavin & Gray 2016, interpolation points 0, +-1, +-2, inf): Y = A^T [(G g G^T) * (B^T d B)] A.
BT = torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                   [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=torch.float64)
G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
AT = torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                   [0, 1, -1, 8, -8, 1]], dtype=torch.float64)


def rounded(dtype):
    return lambda t: t.to(dtype).to(torch.float64)


def winograd(x, w, rnd):
    """F(4x4, 3x3) with the transformed input V and weights U rounded by `rnd`, their
    products summed over channels in float64 (f32 accumulation would add ~1e-7)."""
    n, c, h, wd = x.shape
    k = w.shape[0]
    xp = torch.nn.functional.pad(x, (1, 1 + (-wd) % 4, 1, 1 + (-h) % 4))
    th, tw = (h + 3) // 4, (wd + 3) // 4
    patches = xp.unfold(2, 6, 4).unfold(3, 6, 4)  # n, c, th, tw, 6, 6
    v = rnd(torch.einsum("ia,nctwab,jb->nctwij", BT, patches, BT))
    u = rnd(torch.einsum("ia,kcab,jb->kcij", G, w, G))
    m = torch.einsum("nctwij,kcij->nktwij", v, u)
    y = torch.einsum("ai,nktwij,bj->nktwab", AT, m, AT)
    return y.permute(0, 1, 2, 4, 3, 5).reshape(n, k, th * 4, tw * 4)[:, :, :h, :wd]


def main():
    torch.manual_seed(0)
    print("channels | F(4,3), f32 operands | F(4,3), bf16 operands | direct, bf16 inputs")
    for c in (64, 128):
        x = torch.randn(8, c, 16, 16, dtype=torch.float64).relu()
        w = torch.randn(64, c, 3, 3, dtype=torch.float64) / (3 * c**0.5)
        ref = torch.nn.functional.conv2d(x, w, padding=1)

        def err(y):
            return "%.1e / %.1e" % (
                ((y - ref).norm() / ref.norm()).item(),
                ((y - ref).abs().max() / ref.abs().max()).item(),
            )

        bf16 = rounded(torch.bfloat16)
        direct = torch.nn.functional.conv2d(bf16(x), bf16(w), padding=1)
        print(f"{c:8} | {err(winograd(x, w, rounded(torch.float32)))} | "
              f"{err(winograd(x, w, bf16))} | {err(direct)}")


if __name__ == "__main__":
    main()
