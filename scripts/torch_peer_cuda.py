#!/usr/bin/env python3
"""The PyTorch peer's `bench`, on a GPU.

The peer (../shared/reference/realnvp_torch.py; scripts/build-cuda.sh copies it to
dist/peer/) is CPU-only: its preprocessing and sampling draw from CPU generators and it
has no --device option. This wrapper imports it unchanged, builds its model with its own
`build_model`, moves model and batches to the device and times the same protocol as its
`bench` (and as `nvp bench`):

  train   a uint8 batch of `--train-batch` random test images on the host -> device,
          random flips, dequantisation, logit, forward, bpd loss + L2 on the scale
          parameters, backward, gradient clipping, Adam; `--warmup` untimed steps then
          `--train-steps` timed; img/s = batch / median step time.
  eval    eval mode, no_grad, `--eval-batch` test images: upload, dequantise + logit +
          forward + bits/dim, mean read back; 1 warm-up + `--eval-reps` timed.
  sample  eval mode, no_grad, z ~ N(0, I) for `--sample-n` images -> inverse ->
          sigmoid -> uint8 pixels on the host; 1 warm-up + `--sample-reps` timed.

Flips and dequantisation noise are drawn on the device (the natural PyTorch-on-GPU way);
every timed region ends with torch.cuda.synchronize(). PyTorch's own defaults are kept
(eager mode, cudnn.benchmark off, TF32 for convolutions on, for matmuls off) unless
--tf32 / --cudnn-benchmark say otherwise; the JSON records them.

Prints one JSON object per config on stdout (one line each), progress on stderr.

  python3 scripts/torch_peer_cuda.py --peer dist/peer/realnvp_torch.py \
      --data dist/data/cifar10 --configs small,paper
"""

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def load_peer(path):
    spec = importlib.util.spec_from_file_location("realnvp_torch", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import the PyTorch peer from {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    p = argparse.ArgumentParser(description="The PyTorch Real NVP peer's bench on a GPU.")
    p.add_argument("--peer", default="dist/peer/realnvp_torch.py")
    p.add_argument("--data", default="dist/data/cifar10",
                   help="folder with test_batch.bin (the peer's bench times real test images)")
    p.add_argument("--configs", default="small,paper", help="comma-separated: small, paper")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--eval-reps", type=int, default=3)
    p.add_argument("--sample-n", type=int, default=64)
    p.add_argument("--sample-reps", type=int, default=3)
    p.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                   help="TF32 for cuDNN convolutions and cuBLAS matmuls (default: PyTorch's)")
    p.add_argument("--cudnn-benchmark", action="store_true")
    p.add_argument("--json-dir", default="", help="also write <dir>/torch-<config>.json")
    a = p.parse_args(argv)

    P = load_peer(a.peer)
    import torch

    dev = torch.device(a.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("torch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    if a.tf32 != "default":
        on = a.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = on
        torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.benchmark = bool(a.cudnn_benchmark)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def flip(pix, gen):
        f = torch.rand(pix.shape[0], generator=gen, device=pix.device) < 0.5
        return torch.where(f.view(-1, 1, 1, 1), pix.flip(3), pix)

    def preprocess(pix, gen):
        u = torch.rand(pix.shape, generator=gen, device=pix.device, dtype=torch.float32)
        x = (pix.to(torch.float32) + u) / 256.0
        return P.logit_transform(x, P.ALPHA)

    def train_step(model, opt, pix_host, kw, gen):
        pix = pix_host.to(dev)
        pix = flip(pix, gen)
        y, ld_pre = preprocess(pix, gen)
        bpd = P.bits_per_dim(model, y, ld_pre).mean()
        reg = sum((q * q).sum() for q in model.scale_parameters())
        loss = bpd + kw["l2"] * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), kw["clip"])
        opt.step()
        return bpd.item(), float(gn)

    pix_all, _ = P.load_cifar(a.data, train=False)
    results = []
    for name in [c.strip() for c in a.configs.split(",") if c.strip()]:
        if name not in P.CONFIGS:
            raise SystemExit(f"unknown config {name!r}: the peer has {sorted(P.CONFIGS)}")
        torch.manual_seed(a.seed)
        cfg = dict(P.CONFIGS[name])
        kw = P.model_kwargs(cfg)
        model = P.build_model(cfg)
        params = P.count_params(model)
        macs = P.count_conv_macs(model)
        model = model.to(dev)
        opt = P.make_optimizer(model, kw["lr"])
        gen_host = torch.Generator().manual_seed(a.seed)
        gen_dev = torch.Generator(device=dev).manual_seed(a.seed)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        res = dict(config=name, cfg=cfg, device=str(dev), params=params,
                   conv_macs_per_image=macs, torch=torch.__version__,
                   cuda=torch.version.cuda,
                   gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_benchmark=torch.backends.cudnn.benchmark,
                   preprocess="on device")

        # 1. training
        bs = a.train_batch
        model.train()
        times, bpds = [], []
        for i in range(a.warmup + a.train_steps):
            idx = torch.randint(0, pix_all.shape[0], (bs,), generator=gen_host)
            batch = pix_all[idx]
            sync()
            t0 = time.perf_counter()
            bpd, _ = train_step(model, opt, batch, kw, gen_dev)
            sync()
            dt = time.perf_counter() - t0
            if i >= a.warmup:
                times.append(dt)
            bpds.append(bpd)
        med = statistics.median(times)
        res["train"] = dict(batch=bs, steps=len(times), median_s=med, mean_s=statistics.mean(times),
                            min_s=min(times), max_s=max(times), img_per_s=bs / med,
                            first_bpd=bpds[0], last_bpd=bpds[-1])
        log(f"[torch {name}] train: median {med * 1e3:.1f} ms/step -> {bs / med:.1f} img/s "
            f"(bpd {bpds[0]:.3f} -> {bpds[-1]:.3f})")
        # Where a step's time goes, as `nvp bench` splits it: a few more steps, the device
        # synchronised after forward + loss (read back), backward, and clip + Adam. The
        # forward phase here includes the on-device flip/dequantise/logit (nvp's loader
        # does that before the step).
        phases = {"forward": [], "backward": [], "update": []}
        for i in range(min(3, a.train_steps)):
            idx = torch.randint(0, pix_all.shape[0], (bs,), generator=gen_host)
            batch = pix_all[idx]
            sync()
            t0 = time.perf_counter()
            pix = flip(batch.to(dev), gen_dev)
            y, ld_pre = preprocess(pix, gen_dev)
            bpd = P.bits_per_dim(model, y, ld_pre).mean()
            reg = sum((q * q).sum() for q in model.scale_parameters())
            loss = bpd + kw["l2"] * reg
            float(loss.item())
            sync()
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync()
            t2 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), kw["clip"])
            opt.step()
            sync()
            t3 = time.perf_counter()
            phases["forward"].append(t1 - t0)
            phases["backward"].append(t2 - t1)
            phases["update"].append(t3 - t2)
        for k, v in phases.items():
            res[f"train_{k}_s"] = statistics.median(v) if v else None
        if phases["forward"]:
            log(f"[torch {name}] train phases (synchronised): forward {res['train_forward_s']:.4f} s, "
                f"backward {res['train_backward_s']:.4f} s, update {res['train_update_s']:.4f} s")

        # 2. evaluation
        model.eval()
        eb = a.eval_batch
        times = []
        with torch.no_grad():
            for i in range(1 + a.eval_reps):
                lo = (i * eb) % max(1, pix_all.shape[0] - eb + 1)
                batch = pix_all[lo:lo + eb]
                sync()
                t0 = time.perf_counter()
                y, ld_pre = preprocess(batch.to(dev), gen_dev)
                b = P.bits_per_dim(model, y, ld_pre)
                float(b.mean())
                sync()
                dt = time.perf_counter() - t0
                if i >= 1:
                    times.append(dt)
        med = statistics.median(times)
        res["eval"] = dict(batch=eb, reps=len(times), median_s=med, img_per_s=eb / med,
                           min_s=min(times), max_s=max(times))
        log(f"[torch {name}] eval: median {med * 1e3:.1f} ms/batch{eb} -> {eb / med:.1f} img/s")

        # 3. sampling
        sn = a.sample_n
        times = []
        with torch.no_grad():
            for i in range(1 + a.sample_reps):
                sync()
                t0 = time.perf_counter()
                z = torch.randn(sn, model.dim, generator=gen_dev, device=dev)
                px = P.postprocess(model.inverse(z)).cpu()
                sync()
                dt = time.perf_counter() - t0
                if i >= 1:
                    times.append(dt)
        med = statistics.median(times)
        res["sample"] = dict(n=sn, reps=len(times), median_s=med, img_per_s=sn / med,
                             min_s=min(times), max_s=max(times),
                             pixel_mean=float(px.float().mean()))
        log(f"[torch {name}] sample: median {med * 1e3:.1f} ms/{sn} -> {sn / med:.1f} img/s")
        if dev.type == "cuda":
            res["max_gpu_mem_mib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
        # flat keys, named as in `nvp bench --json`
        res["train_img_per_s"] = res["train"]["img_per_s"]
        res["eval_img_per_s"] = res["eval"]["img_per_s"]
        res["sample_img_per_s"] = res["sample"]["img_per_s"]
        print(json.dumps(res), flush=True)
        if a.json_dir:
            os.makedirs(a.json_dir, exist_ok=True)
            with open(os.path.join(a.json_dir, f"torch-{name}.json"), "w") as fh:
                json.dump(res, fh, indent=1)
        results.append(res)
        del model, opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if not results or any(not math.isfinite(r["train_img_per_s"]) for r in results):
        raise SystemExit("no finite result")


if __name__ == "__main__":
    main()
