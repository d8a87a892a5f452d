"""One neural-style-transfer iteration: rabbitkit against PyTorch CPU, each side alone in its process.

    python benchmarks/bench_style.py                       # 256 and 512 px (minutes; a quiet machine)
    python benchmarks/bench_style.py --sizes 32 --repeats 1   # does it run (seconds)

One iteration is what the optimiser asks for at every step: the image's loss
and its gradient.  VGG-19's layers up to ``relu5_1`` (torchvision's
``features.0`` … ``features.29``, random weights from one seed, identical on
both sides), neural-style's losses (content at ``relu4_2``, Gram-matrix style at
``relu1_1`` … ``relu5_1``, total variation, weights 5 / 100 / 1e-3), and the input
gradient, converted to a flat float64 array as scipy's L-BFGS-B takes it.

* rabbitkit: the objective :func:`rabbitkit.visualize.style_transfer` hands to
  scipy (a :class:`~rabbitkit.probe.FeatureProbe` with frozen weights, the
  kernels of :mod:`rabbitkit.layers.style_losses`).
* PyTorch: ``requires_grad`` on the input only, the same losses written with
  ``torch.mm`` / ``mse_loss``, ``loss.backward()``.

Each side runs alone in its own subprocess (no second OpenMP runtime in the
process) with the same thread count; each reports the median time of the timed
iterations after warm-up, its peak RSS (VmHWM) and its loss value (both sides
compute the same function: the values must agree, a check that the comparison
is fair).  Also printed: the CPU model (``benchmarks/machine.py``) and the BLAS libraries
(threadpoolctl).  Run from the repository root so this checkout's rabbitkit is
imported; PyTorch comes from ``--torch-python`` (default /work/venv-torch).
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

BLOCKS = (2, 2, 4, 4, 4)  # VGG-19: convolutions per block
WIDTHS = (64, 128, 256, 512, 512)
CONTENT = 22  # relu4_2
STYLE = (1, 6, 11, 20, 29)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
LAST = 29
WEIGHTS = {"content": 5.0, "style": 100.0, "tv": 1e-3}


# -- shared: the net's layout and weights (numpy only) -----------------------------------
def layout():
    """[("conv", in, out) | ("relu",) | ("pool",)] for features.0 … features.29."""
    layers, channels = [], 3
    for convs, width in zip(BLOCKS, WIDTHS):
        for _ in range(convs):
            layers += [("conv", channels, width), ("relu",)]
            channels = width
        layers.append(("pool",))
    return layers[: LAST + 1]


def weights(seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for index, layer in enumerate(layout()):
        if layer[0] == "conv":
            _, cin, cout = layer
            out[index] = (rng.normal(0, (2.0 / (9 * cin)) ** 0.5, (cout, cin, 3, 3)).astype(np.float32),
                          rng.normal(0, 0.01, cout).astype(np.float32))
    return out


def images(size, seed):
    """(content, style, start) images in the net's input space, (1, 3, size, size) float32."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    return [rng.normal(0, 1, (1, 3, size, size)).astype(np.float32) for _ in range(3)]


def peak_rss_mib():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def timed(fn, warmup, repeats):
    import numpy as np

    value = None
    for _ in range(warmup):
        value = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), value


# -- rabbitkit side -------------------------------------------------------------------------
def rabbit_side(size, seed, warmup, repeats, threads):
    sys.path.insert(0, ROOT)
    # Before numpy, as the rabbit command does: its OPENBLAS_THREAD_TIMEOUT must reach numpy's
    # OpenBLAS as it loads.  Without it this step measured 0.81 s instead of 0.57 s at 256 px.
    import rabbitkit  # noqa: F401
    # isort: split
    import numba
    import numpy as np
    from threadpoolctl import threadpool_info

    from rabbitkit.layers.activations import ReLU
    from rabbitkit.layers.conv2d import Conv2D
    from rabbitkit.layers.pooling import MaxPool2D
    from rabbitkit.layers.sequential import Sequential
    from rabbitkit.layers.style_losses import (
        ContentLoss,
        StyleLoss,
        TotalVariationLoss,
        gram_matrix,
    )
    from rabbitkit.probe import FeatureProbe
    from rabbitkit.visualize.style import _Objective

    numba.set_num_threads(threads)
    params = weights(seed)
    layers = []
    for index, layer in enumerate(layout()):
        if layer[0] == "conv":
            conv = Conv2D(layer[1], layer[2], 3, padding=1)
            conv.params["weight"][...], conv.params["bias"][...] = params[index]
            layers.append(conv)
        else:
            layers.append(ReLU() if layer[0] == "relu" else MaxPool2D(2))
    net = Sequential(layers)
    content, style, start = images(size, seed)
    names = [str(CONTENT)] + [str(i) for i in STYLE]
    with FeatureProbe(net, names) as probe:
        target = np.array(probe.forward(content)[str(CONTENT)])
        grams = {n: gram_matrix(f) for n, f in probe.forward(style).items() if n != str(CONTENT)}
        objective = _Objective(probe, [(str(CONTENT), ContentLoss(target, WEIGHTS["content"]))],
                               [(n, StyleLoss(grams[n], WEIGHTS["style"])) for n in map(str, STYLE)],
                               TotalVariationLoss(WEIGHTS["tv"]), start.shape, np.float32)
        flat = start.reshape(-1).astype(np.float64)
        seconds, (value, grad) = timed(lambda: objective(flat), warmup, repeats)
    blas = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')} "
            f"threads={i.get('num_threads')} ({os.path.basename(i.get('filepath', ''))})"
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"seconds": seconds, "loss": float(value), "grad_norm": float(np.linalg.norm(grad)),
            "terms": {k: objective.terms[k] for k in ("content", "style", "tv")},
            "peak_rss_mib": peak_rss_mib(), "threads": numba.get_num_threads(), "blas": blas}


# -- PyTorch side ---------------------------------------------------------------------------
def torch_side(size, seed, warmup, repeats, threads):
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    params = weights(seed)
    modules = []
    for index, layer in enumerate(layout()):
        if layer[0] == "conv":
            conv = torch.nn.Conv2d(layer[1], layer[2], 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(params[index][0]))
                conv.bias.copy_(torch.from_numpy(params[index][1]))
            modules.append(conv)
        else:
            modules.append(torch.nn.ReLU() if layer[0] == "relu" else torch.nn.MaxPool2d(2))
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)
    content, style, start = (torch.from_numpy(a) for a in images(size, seed))

    def features(x):
        out = {}
        for index, module in enumerate(modules):
            x = module(x)
            if index == CONTENT or index in STYLE:
                out[index] = x
        return out

    def gram(f):
        _, c, h, w = f.shape
        flat = f.reshape(c, h * w)
        return torch.mm(flat, flat.t()) / (c * h * w)

    with torch.no_grad():
        target = features(content)[CONTENT].clone()
        grams = {i: gram(f) for i, f in features(style).items() if i in STYLE}
    flat = start.reshape(-1).double().numpy().copy()
    terms = {}

    def objective():
        x = torch.from_numpy(flat.astype(np.float32).reshape(start.shape)).requires_grad_(True)
        out = features(x)
        content_loss = WEIGHTS["content"] * F.mse_loss(out[CONTENT], target)
        style_loss = sum(WEIGHTS["style"] * F.mse_loss(gram(out[i]), grams[i]) for i in STYLE)
        right = x[:, :, :-1, :-1] - x[:, :, :-1, 1:]
        down = x[:, :, :-1, :-1] - x[:, :, 1:, :-1]
        tv = 0.5 * WEIGHTS["tv"] * (right.pow(2).sum() + down.pow(2).sum())
        total = content_loss + style_loss + tv
        total.backward()
        terms.update(content=content_loss.item(), style=style_loss.item(), tv=tv.item())
        return total.item(), x.grad.double().numpy().reshape(-1)

    seconds, (value, grad) = timed(objective, warmup, repeats)
    return {"seconds": seconds, "loss": float(value), "grad_norm": float(np.linalg.norm(grad)), "terms": terms,
            "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads(),
            "torch": f"{torch.__version__} ({torch.backends.mkldnn.is_available() and 'oneDNN' or 'no oneDNN'})"}


# -- orchestration ------------------------------------------------------------------------------
def run_side(python, side, size, args):
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[name] = str(args.threads)
    command = [python, os.path.abspath(__file__), "--side", side, "--sizes", str(size), "--seed", str(args.seed),
               "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{side} side failed at {size} px:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,512", help="image sides, comma-separated")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-python", default="/work/venv-torch/bin/python")
    parser.add_argument("--side", choices=["rabbit", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.side:
        fn = rabbit_side if args.side == "rabbit" else torch_side
        print(json.dumps(fn(sizes[0], args.seed, args.warmup, args.repeats, args.threads)))
        return
    print(f"CPU: {cpu_model()}; threads per side: {args.threads}; warm-up {args.warmup}, "
          f"median of {args.repeats} iterations")
    rows, blas, torch_version = [], None, None
    for size in sizes:
        r = run_side(sys.executable, "rabbit", size, args)
        t = run_side(args.torch_python, "torch", size, args)
        blas, torch_version = r["blas"], t["torch"]
        agree = abs(r["loss"] - t["loss"]) <= 1e-3 * abs(t["loss"])
        rows.append(f"| {size} | {r['seconds'] * 1e3:.1f} | {t['seconds'] * 1e3:.1f} | "
                    f"{t['seconds'] / r['seconds']:.2f}x | {r['peak_rss_mib']:.0f} | {t['peak_rss_mib']:.0f} | "
                    f"{r['loss']:.6g} / {t['loss']:.6g}{'' if agree else ' (DIFFER)'} |")
    print(f"BLAS (rabbitkit side): {'; '.join(blas) or 'threadpoolctl found none'}")
    print(f"PyTorch: {torch_version}")
    print()
    print("| px | rabbitkit ms | PyTorch ms | speed vs PyTorch | rabbitkit peak RSS MiB | PyTorch peak RSS MiB "
          "| loss rabbitkit / PyTorch |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
