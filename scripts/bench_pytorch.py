#!/usr/bin/env python3
"""Times the DiT forward pass in PyTorch on this machine, for side-by-side comparison with
`dydit bench` (same presets, batch sizes, warm-up and median). Not part of the test suite.

Usage:  python3 scripts/bench_pytorch.py --model DiT-S/2,DiT-XL/2 --batch 2,8 [--dtype bf16] [--json]
        python3 scripts/bench_pytorch.py --device cuda ...   # forward on the GPU, like a CUDA `dydit bench`
        python3 scripts/bench_pytorch.py --train --model small,DiT-S/2 --batch 8   # like `dydit bench --train`
        python3 scripts/bench_pytorch.py --vae --runs 3    # SD-VAE decode of one 256² image, like `dydit bench --vae`

`--vae` times the SD-VAE decoder (diffusers `Decoder` + `post_quant_conv`: channels 128/256/512/512,
2+1 resnets per block, GroupNorm 32, one single-head mid attention) on a 4×32×32 latent, with the
weights `dydit bench --vae` uses (N(0, 1/fan_in), zero biases).

`--train` times one DiT training iteration as `dydit bench --train` does ("dit" mode): forward +
ε-MSE loss, backward, AdamW step (median over runs, reported as fwd/bwd/opt). `small` is the
Fashion-MNIST model (32×32×1, patch 4, C 192, depth 6, 6 heads).

The network follows facebookresearch/DiT `models.py` (adaLN-Zero blocks, timm-style attention
through `scaled_dot_product_attention`, GELU-tanh, non-affine LayerNorm eps 1e-6), with random
weights; it needs only `torch`.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.h = h
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def forward(self, x, c):
        b, n, d = x.shape
        sm, cm, gm, sp, cp, gp = self.ada(c).chunk(6, dim=1)
        q, k, v = self.qkv(modulate(self.norm1(x), sm, cm)).reshape(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gm.unsqueeze(1) * self.proj(a)
        y = self.fc2(F.gelu(self.fc1(modulate(self.norm2(x), sp, cp)), approximate="tanh"))
        return x + gp.unsqueeze(1) * y


class DiT(nn.Module):
    def __init__(self, depth, c, h, p, size=32, cin=4, classes=1000):
        super().__init__()
        self.p, self.cin = p, cin
        self.x_embed = nn.Conv2d(cin, c, p, p)
        self.pos = nn.Parameter(torch.randn(1, (size // p) ** 2, c) * 0.02)
        self.t1, self.t2 = nn.Linear(256, c), nn.Linear(c, c)
        self.y = nn.Embedding(classes + 1, c)
        self.blocks = nn.ModuleList([Block(c, h) for _ in range(depth)])
        self.norm = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.fada = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))
        self.out = nn.Linear(c, p * p * 2 * cin)

    def forward(self, x, t, y):
        x = self.x_embed(x).flatten(2).transpose(1, 2) + self.pos
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        tf = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(x.dtype)
        c = self.t2(F.silu(self.t1(tf))) + self.y(y)
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = self.fada(c).chunk(2, dim=1)
        x = self.out(modulate(self.norm(x), shift, scale))
        b, n, _ = x.shape
        g = int(n ** 0.5)
        x = x.reshape(b, g, g, self.p, self.p, 2 * self.cin).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 2 * self.cin, g * self.p, g * self.p)


def config(name):
    """(depth, hidden, heads, patch, input size, channels, classes) of a preset or `small`."""
    if name == "small":
        return 6, 192, 6, 4, 32, 1, 10
    size, p = name.split("-")[1].split("/")
    depth, c, h = SIZES[size]
    return depth, c, h, int(p), 32, 4, 1000


def bench_train(a):
    for name in a.model.split(","):
        depth, c, h, p, size, cin, classes = config(name)
        m = DiT(depth, c, h, p, size, cin, classes).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0)
        for b in [int(x) for x in a.batch.split(",")]:
            f, bw, o = [], [], []
            for i in range(a.warmup + a.runs):
                x = torch.randn(b, cin, size, size)
                noise = torch.randn(b, cin, size, size)
                t = torch.randint(0, 1000, (b,))
                y = torch.randint(0, classes, (b,))
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
                    out = m(x, t, y)
                loss = F.mse_loss(out[:, :cin].float(), noise) + out[:, cin:].float().square().mean() * 1e-3
                t1 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                t2 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1e9)
                opt.step()
                t3 = time.perf_counter()
                if i >= a.warmup:
                    f.append((t1 - t0) * 1e3)
                    bw.append((t2 - t1) * 1e3)
                    o.append((t3 - t2) * 1e3)
            fm, bm, om = (statistics.median(v) for v in (f, bw, o))
            rec = {"model": name, "batch": b, "mode": "dit", "dtype": a.dtype, "forward_ms": fm, "backward_ms": bm,
                   "optimizer_ms": om, "step_ms": fm + bm + om, "impl": "pytorch", "torch": torch.__version__,
                   "threads": torch.get_num_threads()}
            print(json.dumps(rec) if a.json else
                  f"{name:<9} {b:>5} {'dit':<15} {fm:>10.1f} {bm:>11.1f} {om:>8.1f} {fm + bm + om:>9.1f}  (PyTorch {torch.__version__}, {a.dtype})")


class Resnet(nn.Module):
    def __init__(self, ci, co):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(32, ci, eps=1e-6), nn.Conv2d(ci, co, 3, padding=1)
        self.n2, self.c2 = nn.GroupNorm(32, co, eps=1e-6), nn.Conv2d(co, co, 3, padding=1)
        self.sc = nn.Conv2d(ci, co, 1) if ci != co else None

    def forward(self, x):
        h = self.c2(F.silu(self.n2(self.c1(F.silu(self.n1(x))))))
        return (self.sc(x) if self.sc is not None else x) + h


class MidAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = nn.GroupNorm(32, c, eps=1e-6)
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)
        a = F.scaled_dot_product_attention(self.q(t)[:, None], self.k(t)[:, None], self.v(t)[:, None])[:, 0]
        return x + self.o(a).transpose(1, 2).reshape(b, c, h, w)


class VaeDecoder(nn.Module):
    def __init__(self, ch=(128, 256, 512, 512), layers=2, z=4):
        super().__init__()
        self.post_quant = nn.Conv2d(z, z, 1)
        self.conv_in = nn.Conv2d(z, ch[-1], 3, padding=1)
        self.mid = nn.Sequential(Resnet(ch[-1], ch[-1]), MidAttention(ch[-1]), Resnet(ch[-1], ch[-1]))
        rev, ci, self.ups = ch[::-1], ch[-1], nn.ModuleList()
        for i, co in enumerate(rev):
            blk = nn.ModuleList([Resnet(ci if j == 0 else co, co) for j in range(layers + 1)])
            blk.up = nn.Conv2d(co, co, 3, padding=1) if i + 1 < len(rev) else None
            self.ups.append(blk)
            ci = co
        self.norm_out, self.conv_out = nn.GroupNorm(32, ch[0], eps=1e-6), nn.Conv2d(ch[0], 3, 3, padding=1)

    def forward(self, z):
        x = self.mid(self.conv_in(self.post_quant(z)))
        for blk in self.ups:
            for r in blk:
                x = r(x)
            if blk.up is not None:
                x = blk.up(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(x)))


def bench_vae(a):
    m = VaeDecoder().eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, (1.0 / p[0].numel()) ** 0.5)
            else:
                p.zero_()
        for mod in m.modules():
            if isinstance(mod, nn.GroupNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
    z = torch.randn(1, 4, a.image_size // 8, a.image_size // 8)
    times = []
    with torch.inference_mode():
        for i in range(a.warmup + a.runs):
            t0 = time.perf_counter()
            m(z)
            if i >= a.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    rec = {"bench": "vae", "image_size": a.image_size, "decode_ms": ms, "impl": "pytorch", "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    print(json.dumps(rec) if a.json else
          f"SD VAE decode {a.image_size}²: PyTorch {ms:.0f} ms (PyTorch {torch.__version__}, {torch.get_num_threads()} threads)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="DiT-S/2,DiT-XL/2")
    ap.add_argument("--batch", default="2,8")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--vae", action="store_true")
    ap.add_argument("--image-size", type=int, default=256)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_flush_denormal(True)
    if a.train:
        return bench_train(a)
    if a.vae:
        return bench_vae(a)
    for name in a.model.split(","):
        size, p = name.split("-")[1].split("/")
        depth, c, h = SIZES[size]
        dev = torch.device(a.device)
        m = DiT(depth, c, h, int(p)).eval().to(dev)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        for b in [int(x) for x in a.batch.split(",")]:
            x = torch.randn(b, 4, 32, 32, device=dev)
            t = torch.randint(0, 1000, (b,), device=dev)
            y = torch.randint(0, 1000, (b,), device=dev)
            times = []
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
                for i in range(a.warmup + a.runs):
                    sync()
                    t0 = time.perf_counter()
                    m(x, t, y)
                    sync()
                    if i >= a.warmup:
                        times.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(times)
            rec = {"model": name, "batch": b, "dtype": a.dtype, "forward_ms": ms, "impl": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
            print(json.dumps(rec) if a.json else f"{name:<10} {b:>5} {ms:>12.1f}  (PyTorch {torch.__version__}, {a.dtype}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
