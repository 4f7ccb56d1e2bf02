#!/usr/bin/env python3
"""Real NVP weights between the PyTorch peer (../shared/reference/realnvp_torch.py) and nvp.

The peer and nvp build the same network (same masks, squeeze order, factor-out, weight
norm, batch norms; ARCHITECTURE.md, "Differences from the PyTorch peer"), so a peer
checkpoint maps tensor by tensor onto nvp's parameter names.

  convert CKPT OUT_DIR [--data DIR]
      A peer checkpoint (`ckpt.pt` of `realnvp_torch.py train`) -> an nvp checkpoint
      folder: `model.safetensors` (nvp's names, f32, batch-norm running statistics
      included) and `config.toml`. Then `nvp eval --ckpt OUT_DIR`, `nvp sample`,
      `nvp interpolate` use it as one of their own.

  export CKPT_DIR OUT.pt
      The other way: an nvp checkpoint folder (or run folder) -> a `ckpt.pt` that
      `realnvp_torch.py eval/sample --ckpt` loads (square images, `bn-variant = "batch"`,
      `bn-affine = false`, `classes = 0`). Its averaged model (`ema.safetensors`, from
      `train.ema`) when it has one, as `nvp eval` does.

  fixture OUT.safetensors [--peer PATH]
      The cross-framework fixture of `tests/torch_parity.rs`: a small peer model in
      float64 with every parameter and running statistic randomised, its weights under
      nvp's names, and what the peer computes with them — latents and log-determinants
      in eval and train mode, the running statistics after the train-mode pass, the
      inverse of given latents, bits/dim of 8-bit images with given dequantisation
      noise, and the gradient of the peer's training loss for every parameter.

Needs torch and safetensors (pip install torch safetensors). Not run in CI: the fixture
it writes is committed.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import sys

import torch
from safetensors.torch import save_file

# The peer's defaults (realnvp_torch.py, DEFAULTS) for keys a checkpoint's config omits.
PEER_DEFAULTS = dict(in_ch=3, size=32, n_checker=3, n_channel=3, n_final=4,
                     bn_momentum=0.1, bn_eps=1e-5, lr=1e-3, l2=5e-5, clip=100.0)
ALPHA = 0.05


def nvp_name(key):
    """The nvp parameter name of a peer state_dict key; None for keys nvp does not keep
    (`num_batches_tracked`)."""
    if key.endswith("num_batches_tracked"):
        return None
    m = re.fullmatch(r"scales\.(\d+)\.(checker|channel)\.(\d+)\.(.+)", key)
    if m is None:
        raise SystemExit(f"unexpected tensor in the peer checkpoint: {key}")
    k, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    # The peer's ModuleLists interleave coupling (even index) and its batch norm (odd).
    i = j // 2
    if j % 2 == 1:
        return f"scale{k}.{kind}{i}_bn.{rest}"
    if rest == "s_scale":
        rest = "scale"
    return f"scale{k}.{kind}{i}.{rest}"


def nvp_tensors(state_dict, dtype):
    out = {}
    for key, t in state_dict.items():
        name = nvp_name(key)
        if name is not None:
            out[name] = t.detach().to(dtype).contiguous().clone()
    return out


def model_toml(kw):
    return "\n".join([
        "[model]",
        f"channels = {kw['in_ch']}",
        f"height = {kw['size']}",
        f"width = {kw['size']}",
        f"scales = {kw['num_scales']}",
        f"res-blocks = {kw['n_blocks']}",
        f"features = {kw['features']}",
        f"checkerboard-couplings = {kw['n_checker']}",
        f"channel-couplings = {kw['n_channel']}",
        f"final-couplings = {kw['n_final']}",
        f"bn-momentum = {float(kw['bn_momentum'])!r}",
        f"bn-eps = {float(kw['bn_eps'])!r}",
        'bn-variant = "batch"',
        "bn-affine = false",
    ])


def cmd_convert(a):
    try:
        ck = torch.load(a.ckpt, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several kinds for a file that is not one
        raise SystemExit(f"{a.ckpt}: cannot be read as a PyTorch checkpoint ({e})")
    if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
        raise SystemExit(f"{a.ckpt}: not a checkpoint of realnvp_torch.py "
                         "(expected a dict with 'model' and 'config')")
    kw = dict(PEER_DEFAULTS)
    kw.update(ck["config"])
    tensors = nvp_tensors(ck["model"], torch.float32)
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise SystemExit(f"{a.ckpt}: non-finite values in {bad[0]} (and {len(bad) - 1} more)")
    name = f"torch-{ck.get('config_name', 'peer')}"
    toml = "\n".join([
        f"# Converted by scripts/torch_interop.py from {os.path.abspath(a.ckpt)}",
        f"# (the peer's step {ck.get('step')}).",
        f'name = "{name}"',
        "",
        "[data]",
        'dataset = "cifar10"',
        f"path = {json.dumps(a.data)}",
        "flip = true",
        f"alpha = {ALPHA}",
        "",
        model_toml(kw),
        "",
        "[train]",
        f"batch-size = {int(kw.get('batch', 64))}",
        f"lr = {float(kw['lr'])!r}",
        f"l2 = {float(kw['l2'])!r}",
        f"clip = {float(kw['clip'])!r}",
        f"seed = {int(ck.get('seed', 0))}",
        "",
    ])
    os.makedirs(a.out, exist_ok=True)
    tmp = os.path.join(a.out, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"source": os.path.abspath(a.ckpt)})
    os.replace(tmp, os.path.join(a.out, "model.safetensors"))
    with open(os.path.join(a.out, "config.toml"), "w") as fh:
        fh.write(toml)
    n = sum(t.numel() for n, t in tensors.items() if "running_" not in n)
    print(f"{a.out}: {len(tensors)} tensors, {n} trainable parameters, config {name}")


def peer_key(name):
    """The peer state_dict key of an nvp parameter name (inverse of `nvp_name`)."""
    m = re.fullmatch(r"scale(\d+)\.(checker|channel)(\d+)(_bn)?\.(.+)", name)
    if m is None:
        raise SystemExit(f"unexpected tensor in the nvp checkpoint: {name}")
    k, kind, i, bn, rest = int(m[1]), m[2], int(m[3]), m[4], m[5]
    if bn:
        return f"scales.{k}.{kind}.{2 * i + 1}.{rest}"
    if rest == "scale":
        rest = "s_scale"
    return f"scales.{k}.{kind}.{2 * i}.{rest}"


def cmd_export(a):
    import tomllib
    from safetensors.torch import load_file
    ckdir = a.ckpt
    if os.path.isdir(os.path.join(ckdir, "last")):
        ckdir = os.path.join(ckdir, "last")
    # The averaged model (train.ema) when the run kept one, as `nvp eval` does.
    weights = "ema.safetensors" if os.path.isfile(os.path.join(ckdir, "ema.safetensors")) \
        else "model.safetensors"
    paths = [os.path.join(ckdir, f) for f in (weights, "config.toml")]
    for p in paths:
        if not os.path.isfile(p):
            raise SystemExit(f"{p} is missing: not an nvp checkpoint folder")
    with open(paths[1], "rb") as fh:
        cfg = tomllib.load(fh)
    m = cfg.get("model", {})
    if (m.get("bn-variant", "batch") != "batch" or m.get("bn-affine", False)
            or m.get("classes", 0) != 0 or m.get("height") != m.get("width")):
        raise SystemExit(f"{paths[1]}: the peer builds unconditional models of square images "
                         "with batch-statistics batch norm and no learned affine only")
    tr = cfg.get("train", {})
    peer_cfg = dict(num_scales=m["scales"], n_blocks=m["res-blocks"], features=m["features"],
                    in_ch=m["channels"], size=m["height"], n_checker=m["checkerboard-couplings"],
                    n_channel=m["channel-couplings"], n_final=m["final-couplings"],
                    bn_momentum=m["bn-momentum"], bn_eps=m["bn-eps"],
                    batch=tr.get("batch-size", 64), lr=tr.get("lr", 1e-3),
                    l2=tr.get("l2", 5e-5), clip=tr.get("clip", 100.0))
    state = {}
    for name, t in load_file(paths[0]).items():
        state[peer_key(name)] = t.to(torch.float32)
        if name.endswith("running_var") and "_bn." not in name:
            # nn.BatchNorm2d's counter, which nvp does not keep.
            nbt = peer_key(name).rsplit(".", 1)[0] + ".num_batches_tracked"
            state[nbt] = torch.tensor(0, dtype=torch.long)
    ck = dict(model=state, config=peer_cfg, config_name=cfg.get("name", "nvp"), step=None,
              seed=tr.get("seed", 0))
    tmp = a.out + ".tmp"
    torch.save(ck, tmp)
    os.replace(tmp, a.out)
    n = sum(t.numel() for k, t in state.items() if "running_" not in k and "num_batches" not in k)
    print(f"{a.out}: {len(state)} tensors, {n} trainable parameters (from {paths[0]})")


def load_peer(path):
    spec = importlib.util.spec_from_file_location("realnvp_torch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cmd_fixture(a):
    peer = load_peer(a.peer)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(20261127)
    dt = torch.float64
    kw = dict(PEER_DEFAULTS)
    kw.update(num_scales=2, n_blocks=1, features=4, size=8, n_checker=2, n_channel=2,
              n_final=3)
    model = peer.RealNVP(**kw).to(dt)
    c, s = kw["in_ch"], kw["size"]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dt)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=dt)

    # Every parameter away from its initial value: weight-norm gains off ||v||,
    # non-zero biases and output convolutions, batch-norm affines, tanh scales.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, peer.WNConv2d):
                norm = m.v.flatten(1).norm(dim=1)
                m.g.copy_(norm * (0.5 + rand(*m.g.shape)))
                m.bias.copy_(0.1 * randn(*m.bias.shape))
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.6 + 0.8 * rand(*m.weight.shape))
                m.bias.copy_(0.2 * randn(*m.bias.shape))
            elif isinstance(m, peer.AffineCoupling):
                m.s_scale.copy_(0.5 + rand(*m.s_scale.shape))
        # Running statistics from train-mode passes over shifted, scaled inputs.
        model.train()
        for _ in range(20):
            model(randn(16, c, s, s) * 1.5 + 0.3)
    model.eval()
    out = {f"param.{n}": t for n, t in nvp_tensors(model.state_dict(), dt).items()}
    d = c * s * s

    with torch.no_grad():
        # Eval mode: latents and log-det, and the inverse of given latents.
        x = randn(4, c, s, s) * 1.5 + 0.3
        z, ld = model(x)
        out.update(x_eval=x, z_eval=z, ld_eval=ld)
        zi = randn(4, d)
        out.update(z_inv=zi, x_inv=model.inverse(zi))
        # bits/dim of 8-bit images with given dequantisation noise.
        pix = torch.randint(0, 256, (4, c, s, s), generator=gen, dtype=torch.uint8)
        u = rand(4, c, s, s)
        y, ld_pre = peer.logit_transform((pix.to(dt) + u) / 256.0, ALPHA)
        out.update(pix_eval=pix, u_eval=u, bpd_eval=peer.bits_per_dim(model, y, ld_pre))

    # Train mode: one pass with batch statistics (it updates the running averages),
    # the peer's training loss (mean bits/dim + l2 · Σ scale parameters²) and its
    # gradient for every parameter.
    model.train()
    pix = torch.randint(0, 256, (8, c, s, s), generator=gen, dtype=torch.uint8)
    u = rand(8, c, s, s)
    y, ld_pre = peer.logit_transform((pix.to(dt) + u) / 256.0, ALPHA)
    z, ld = model(y)
    log_pz = -0.5 * (z * z).sum(1) - 0.5 * d * math.log(2 * math.pi)
    bpd = -(log_pz + ld + ld_pre - d * math.log(256.0)) / (d * math.log(2.0))
    reg = sum((p * p).sum() for p in model.scale_parameters())
    loss = bpd.mean() + kw["l2"] * reg
    loss.backward()
    out.update(pix_train=pix, u_train=u, z_train=z.detach(), ld_train=ld.detach(),
               bpd_train=bpd.detach(), loss_train=loss.detach().reshape(1))
    for n, t in nvp_tensors(model.state_dict(), dt).items():
        if "running_" in n:
            out[f"after.{n}"] = t
    for key, p in model.named_parameters():
        out[f"grad.{nvp_name(key)}"] = p.grad.detach().to(dt).clone()

    out = {k: v.contiguous() for k, v in out.items()}
    cfg = model_toml(kw).replace("[model]\n", "")
    meta = {
        "model": cfg,
        "alpha": repr(ALPHA),
        "l2": repr(kw["l2"]),
        "generated-by": "python scripts/torch_interop.py fixture " + a.out,
        "torch": torch.__version__,
    }
    save_file(out, a.out, metadata=meta)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"{a.out}: {len(out)} tensors, model of {nparam} parameters, "
          f"eval bpd {out['bpd_eval'].tolist()}")


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="a peer ckpt.pt -> an nvp checkpoint folder")
    c.add_argument("ckpt")
    c.add_argument("out")
    c.add_argument("--data", default="data/cifar-10-batches-bin",
                   help="data.path written into config.toml")
    e = sub.add_parser("export", help="an nvp checkpoint folder -> a peer ckpt.pt")
    e.add_argument("ckpt")
    e.add_argument("out")
    f = sub.add_parser("fixture", help="the fixture of tests/torch_parity.rs")
    f.add_argument("out")
    f.add_argument("--peer", default=os.path.join(here, "..", "..", "shared", "reference",
                                                  "realnvp_torch.py"))
    a = p.parse_args(argv)
    {"convert": cmd_convert, "export": cmd_export, "fixture": cmd_fixture}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
