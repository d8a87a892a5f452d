"""One Deep Dream step (forward to the layer + input gradient) against PyTorch CPU.

    python benchmarks/bench_dream.py                  # 224 px, VGG-16- and GoogLeNet-shaped nets
    python benchmarks/bench_dream.py --size 64 --repeats 1   # a quick check that it runs

Nets (random weights; the speed does not depend on them):

* VGG-16-shaped: VGG-16's 13 convolutions (3x3, padding 1) with ReLU and 2x2
  max-pools; the objective reads the last ReLU (``conv5_3``), before the last pool.
* GoogLeNet-shaped: the stem (7x7/2 conv, 3x3/2 max-pool, LRN, 1x1 and 3x3
  convs, LRN, 3x3/2 max-pool) and inception modules 3a, 3b, 4a, 4b, 4c with
  the paper's widths; the objective reads ``inception_4c``'s output (google/deepdream's
  default layer).  Max-pools pad 1 in floor mode, which gives Caffe's ceil-mode sizes at 224 px.

A step: forward to the layer in inference mode, the L2 objective's gradient (the
layer's own output), backward to the input with frozen weights.  rabbitkit uses
:class:`rabbitkit.visualize.gradients.ImageGradient`; PyTorch runs the same net
with ``requires_grad`` on the input only.  Each side runs alone in its own
subprocess with the same thread count (Numba's); printed: the median seconds per
step over ``--repeats`` after two warm-up steps, peak RSS, the ratio, the CPU model
(``benchmarks/machine.py``: family, model, vector instructions) and the BLAS libraries each side loaded (threadpoolctl).
"""
import argparse
import json
import os
import subprocess
import sys
import time

from machine import cpu_model  # benchmarks/machine.py: the name rabbitkit's tuning cache uses

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
# name: (c1, c3_reduce, c3, c5_reduce, c5, pool_proj); a 3x3/2 max-pool before "4a"
INCEPTION = (("3a", (64, 96, 128, 16, 32, 32)), ("3b", (128, 128, 192, 32, 96, 64)),
             ("4a", (192, 96, 208, 16, 48, 64)), ("4b", (160, 112, 224, 24, 64, 64)),
             ("4c", (128, 128, 256, 24, 64, 64)))


def out_channels(widths):
    c1, _, c3, _, c5, pool_proj = widths
    return c1 + c3 + c5 + pool_proj


# -- rabbitkit ---------------------------------------------------------------------------
def rabbit_vgg():
    from rabbitkit.layers.activations import ReLU
    from rabbitkit.layers.conv2d import Conv2D
    from rabbitkit.layers.pooling import MaxPool2D
    from rabbitkit.layers.sequential import Sequential

    layers, channels = [], 3
    for b, block in enumerate(VGG16_BLOCKS):
        for out in block:
            layers += [Conv2D(channels, out, 3, padding=1), ReLU()]
            channels = out
        if b < len(VGG16_BLOCKS) - 1:
            layers.append(MaxPool2D(2))
    return Sequential(layers), str(len(layers) - 1)


def rabbit_googlenet():
    from rabbitkit.layers.activations import ReLU
    from rabbitkit.layers.conv2d import Conv2D
    from rabbitkit.layers.lrn import LocalResponseNorm
    from rabbitkit.layers.pooling import MaxPool2D
    from rabbitkit.layers.sequential import Sequential
    from rabbitkit.models.inception import inception_module

    layers = {"conv1": Conv2D(3, 64, 7, stride=2, padding=3), "relu1": ReLU(),
              "pool1": MaxPool2D(3, stride=2, padding=1), "norm1": LocalResponseNorm(5, 1e-4, 0.75, 1.0),
              "conv2_reduce": Conv2D(64, 64, 1), "relu2_reduce": ReLU(), "conv2": Conv2D(64, 192, 3, padding=1),
              "relu2": ReLU(), "norm2": LocalResponseNorm(5, 1e-4, 0.75, 1.0), "pool2": MaxPool2D(3, stride=2, padding=1)}
    channels = 192
    for name, widths in INCEPTION:
        if name == "4a":
            layers["pool3"] = MaxPool2D(3, stride=2, padding=1)
        layers[f"inception_{name}"] = inception_module(channels, *widths)
        channels = out_channels(widths)
    return Sequential(layers), "inception_4c"


def rabbit_step_seconds(net_name, size, repeats):
    import numpy as np

    from rabbitkit.visualize.gradients import ImageGradient
    from rabbitkit.visualize.objectives import LayerL2

    net, layer = {"vgg16": rabbit_vgg, "googlenet": rabbit_googlenet}[net_name]()
    x = np.random.default_rng(0).normal(size=(1, 3, size, size)).astype(np.float32)
    with ImageGradient(net, LayerL2(layer)) as gradient:
        return median_seconds(lambda: gradient(x), repeats)


# -- PyTorch -------------------------------------------------------------------------------
def torch_vgg():
    import torch.nn as nn

    layers, channels = [], 3
    for b, block in enumerate(VGG16_BLOCKS):
        for out in block:
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
            channels = out
        if b < len(VGG16_BLOCKS) - 1:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def torch_googlenet():
    import torch
    import torch.nn as nn

    class Inception(nn.Module):
        def __init__(self, c_in, c1, c3r, c3, c5r, c5, pool_proj):
            super().__init__()
            unit = lambda i, o, k: [nn.Conv2d(i, o, k, padding=k // 2), nn.ReLU()]  # noqa: E731
            self.branches = nn.ModuleList([
                nn.Sequential(*unit(c_in, c1, 1)),
                nn.Sequential(*unit(c_in, c3r, 1), *unit(c3r, c3, 3)),
                nn.Sequential(*unit(c_in, c5r, 1), *unit(c5r, c5, 5)),
                nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *unit(c_in, pool_proj, 1)),
            ])

        def forward(self, x):
            return torch.cat([branch(x) for branch in self.branches], 1)

    layers = [nn.Conv2d(3, 64, 7, stride=2, padding=3), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
              nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0), nn.Conv2d(64, 64, 1), nn.ReLU(),
              nn.Conv2d(64, 192, 3, padding=1), nn.ReLU(), nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0),
              nn.MaxPool2d(3, stride=2, padding=1)]
    channels = 192
    for name, widths in INCEPTION:
        if name == "4a":
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        layers.append(Inception(channels, *widths))
        channels = out_channels(widths)
    return nn.Sequential(*layers)


def torch_step_seconds(net_name, size, repeats, threads):
    import torch

    torch.set_num_threads(threads)
    net = {"vgg16": torch_vgg, "googlenet": torch_googlenet}[net_name]().eval()
    for param in net.parameters():
        param.requires_grad_(False)
    x0 = torch.from_numpy(__import__("numpy").random.default_rng(0).normal(size=(1, 3, size, size)).astype("float32"))

    def step():
        x = x0.clone().requires_grad_(True)
        y = net(x)
        (0.5 * (y * y).sum()).backward()
        return x.grad

    return median_seconds(step, repeats)


# -- harness -------------------------------------------------------------------------------------
def median_seconds(step, repeats):
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def blas_report():
    from threadpoolctl import threadpool_info

    return [f"{i.get('internal_api')} {i.get('version', '')} {os.path.basename(i['filepath'])} "
            f"({i.get('num_threads')} threads)" for i in threadpool_info()]


def child(side, net_name, size, repeats, threads):
    if side == "rabbit":
        sys.path.insert(0, ROOT)
        seconds = rabbit_step_seconds(net_name, size, repeats)
    else:
        seconds = torch_step_seconds(net_name, size, repeats, threads)
    print(json.dumps({"seconds": seconds, "rss_mb": peak_rss_mb(), "blas": blas_report()}))


def run_child(python, side, net_name, size, repeats, threads, env=None):
    args = [python, os.path.abspath(__file__), "--child", side, "--net", net_name, "--size", str(size),
            "--repeats", str(repeats), "--threads", str(threads)]
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{side} {net_name} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nets", default="vgg16,googlenet")
    parser.add_argument("--torch-python", default="/work/venv-torch/bin/python",
                        help="Python with torch installed (default: the project's torch venv)")
    parser.add_argument("--child", choices=["rabbit", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--net", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.net, args.size, args.repeats, args.threads)

    sys.path.insert(0, ROOT)
    import numba

    import rabbitkit

    threads = numba.get_num_threads()
    print(f"# One Deep Dream step at {args.size} px: rabbitkit vs PyTorch CPU, each alone in its own process\n")
    print(f"CPU: {cpu_model()}; threads: {threads} on both sides; {args.repeats} timed steps after 2 warm-up")
    rows = []
    for net_name in args.nets.split(","):
        rabbit = run_child(sys.executable, "rabbit", net_name, args.size, args.repeats, threads)
        torch = run_child(args.torch_python, "torch", net_name, args.size, args.repeats, threads,
                          rabbitkit.foreign_environment())
        rows.append((net_name, rabbit, torch))
    print("\n| net | rabbitkit s/step | PyTorch s/step | speed ratio (PyTorch time / rabbitkit time) "
          "| rabbitkit peak RSS MB | PyTorch peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for net_name, rabbit, torch in rows:
        print(f"| {net_name} | {rabbit['seconds']:.3f} | {torch['seconds']:.3f} | "
              f"{torch['seconds'] / rabbit['seconds']:.2f}x | {rabbit['rss_mb']:.0f} | {torch['rss_mb']:.0f} |")
    for side, report in (("rabbitkit", rows[-1][1]["blas"]), ("PyTorch", rows[-1][2]["blas"])):
        for line in report:
            print(f"BLAS ({side}): {line}")


if __name__ == "__main__":
    main()
