#!/usr/bin/env python3
"""The PyTorch peer's `bench` on the paper's 64x64 architecture (ImageNet 64, CelebA,
LSUN: 5 scales down to 4x4, 2 residual blocks, 32 feature maps doubling per scale;
63 M parameters), which the peer itself does not offer: it knows only the CIFAR-10
configs `small` and `paper`.

This wrapper imports ../shared/reference/realnvp_torch.py unchanged, adds a config `64`
= dict(num_scales=5, n_blocks=2, features=32, size=64, batch=64) to its CONFIGS, makes
its `load_cifar` return 512 seeded random 3x64x64 images (there are no 64x64 images
in ../shared; throughput does not depend on the pixels), stubs the MAC count (it
assumes 32x32 inputs) and runs the peer's own `bench` command with the arguments
given, so the protocol (warm-up, timed steps, medians, RSS) is the peer's.

  python3 scripts/torch_peer_64.py --peer ../shared/reference/realnvp_torch.py \
      --threads 2 bench --config 64 --warmup 1 --train-steps 3 --json out.json

Used by scripts/bench-vs-pytorch.sh 64. Not run in CI.
"""

import importlib.util
import sys


def main():
    argv = sys.argv[1:]
    peer = "../shared/reference/realnvp_torch.py"
    if len(argv) >= 2 and argv[0] == "--peer":
        peer, argv = argv[1], argv[2:]
    spec = importlib.util.spec_from_file_location("realnvp_torch", peer)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import the PyTorch peer from {peer}")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    import torch

    m.CONFIGS["64"] = dict(num_scales=5, n_blocks=2, features=32, size=64, batch=64)

    def random_images(root, train=True, limit=None):
        g = torch.Generator().manual_seed(1234 if train else 4321)
        n = 512 if limit is None else min(limit, 512)
        pix = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g)
        return pix, torch.zeros(n, dtype=torch.int64)

    m.load_cifar = random_images
    m.count_conv_macs = lambda model, size=64, in_ch=3: 0
    return m.main(argv)


if __name__ == "__main__":
    sys.exit(main())
