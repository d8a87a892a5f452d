"""Reference ConvNet training speed: rabbitkit against PyTorch CPU, same process, same threads.

    python benchmarks/bench_convnet.py            # full run (a few minutes)
    python benchmarks/bench_convnet.py --quick    # short sanity run

The net (issue 3): 32x32x3 input, conv3x3(3->32)+ReLU, conv3x3(32->32)+ReLU,
maxpool 2, conv3x3(32->64)+ReLU, conv3x3(64->64)+ReLU, maxpool 2, flatten,
fc(4096->256)+ReLU, dropout 0.5, fc(256->43), softmax cross-entropy, SGD with
momentum 0.9, batch 64 (convolutions padded by 1).

Reports, as a markdown table:
* training images/s (forward + backward + update) of both sides, run in
  alternating blocks in one process, medians of the timed steps, and the ratio;
* each conv layer's GFLOP/s (forward; forward + backward = 3x the forward FLOPs)
  for both sides, against numpy float32 matrix-multiply GFLOP/s of the same run,
  once in this process and once with each side alone in its own subprocess (the
  fair figures: with PyTorch loaded, rabbitkit's kernels run 30-40% slower here);
* peak RSS (VmHWM) and images/s of each side training alone in its own
  subprocess (no second OpenMP runtime in the process), in ``--pairs`` of
  processes (default 5), the order alternating, with each pair's ratio and the
  median: on a shared machine either side's speed drifts over minutes;
* rabbitkit's first-step time with an empty Numba cache (compilation) and in a
  second process that loads the cache (warm start);
* which BLAS libraries and kernels ran (threadpoolctl).

OpenBLAS kernel choice: a machine may set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE
(this one does), which a typical user's does not; the script re-executes
itself with both removed from its own environment and says so.  Tests and CI
leave the environment alone.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
REEXEC_MARK = "RABBITKIT_BENCH_CLEAN_ENV"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

BATCH = 64
CLASSES = 43
CONVS = [(3, 32, 32), (32, 32, 32), (32, 64, 16), (64, 64, 16)]  # (in, out, input side)


def clean_environment():
    """Re-exec without the OpenBLAS overrides (before numpy loads OpenBLAS)."""
    removed = [name for name in OPENBLAS_OVERRIDES if name in os.environ]
    if removed and not os.environ.get(REEXEC_MARK):
        env = {k: v for k, v in os.environ.items() if k not in OPENBLAS_OVERRIDES}
        env[REEXEC_MARK] = ",".join(f"{name}={os.environ[name]}" for name in removed)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return os.environ.get(REEXEC_MARK, "")


# -- the two nets ----------------------------------------------------------------------
def rabbit_net():
    sys.path.insert(0, ROOT)
    from rabbitkit.layers.activations import ReLU
    from rabbitkit.layers.conv2d import Conv2D
    from rabbitkit.layers.dense import Dense
    from rabbitkit.layers.dropout import Dropout
    from rabbitkit.layers.flatten import Flatten
    from rabbitkit.layers.pooling import MaxPool2D
    from rabbitkit.layers.sequential import Sequential

    return Sequential([
        Conv2D(3, 32, 3, padding=1), ReLU(), Conv2D(32, 32, 3, padding=1), ReLU(), MaxPool2D(2),
        Conv2D(32, 64, 3, padding=1), ReLU(), Conv2D(64, 64, 3, padding=1), ReLU(), MaxPool2D(2),
        Flatten(), Dense(4096, 256), ReLU(), Dropout(0.5), Dense(256, CLASSES),
    ])


def torch_net():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4096, 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, CLASSES),
    )


class InlineSGD:
    """SGD with momentum in numpy (used only if rabbitkit.optim.SGD is missing)."""

    def __init__(self, params, lr, momentum):
        self.params, self.lr, self.momentum = params, lr, momentum
        self.buffers = [np.zeros_like(p.value) for p in params]

    def zero_grad(self):
        for p in self.params:
            p.grad.fill(0)

    def step(self):
        for p, buf in zip(self.params, self.buffers):
            buf *= self.momentum
            buf += p.grad
            p.value -= self.lr * buf


class InlineSoftmaxCrossEntropy:
    """Mean softmax cross-entropy in numpy (used only if rabbitkit.losses is missing)."""

    def forward(self, y, target):
        shifted = y - y.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(len(target))
        self._dy = np.exp(log_p)
        self._dy[rows, target] -= 1
        self._dy /= len(target)
        return float(-log_p[rows, target].mean())

    def backward(self):
        return self._dy


def rabbit_trainer(seed=0):
    """(step function, model) for rabbitkit; reports which loss/optimizer it uses."""
    sys.path.insert(0, ROOT)
    import rabbitkit

    rabbitkit.manual_seed(seed)
    model = rabbit_net()
    # As the trainer does (Trainer.__init__): nothing uses the gradient w.r.t. the data,
    # and PyTorch's autograd does not compute it either (the input needs no grad).
    model.skip_input_grad()
    try:
        from rabbitkit.losses import SoftmaxCrossEntropy
        from rabbitkit.optim import SGD

        loss, optimizer, kind = SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.01, momentum=0.9), "rabbitkit"
    except ImportError:  # the losses/optim modules are not there yet
        loss, optimizer, kind = InlineSoftmaxCrossEntropy(), InlineSGD(model.parameters(), 0.01, 0.9), "inline numpy"

    def step(x, t):
        optimizer.zero_grad()
        y = model.forward(x, training=True)
        value = loss.forward(y, t)
        model.backward(loss.backward())
        optimizer.step()
        return value

    return step, model, kind


def torch_trainer(seed=0):
    import torch

    torch.manual_seed(seed)
    model = torch_net()
    loss = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, t):
        optimizer.zero_grad(set_to_none=False)
        value = loss(model(x), t)
        value.backward()
        optimizer.step()
        return value.item()

    return step, model


def batch_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, 3, 32, 32)).astype(np.float32)
    t = rng.integers(0, CLASSES, BATCH)
    return x, t


# -- measurements ----------------------------------------------------------------------
def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_gflops(repeats):
    a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    out = np.empty_like(a)
    np.dot(a, a, out=out)
    return 2 * 2048**3 / median_time(lambda: np.dot(a, a, out=out), repeats) / 1e9


def training_speed(blocks, steps, warmup):
    """images/s of both sides, in alternating blocks so machine noise hits both."""
    import torch

    x, t = batch_data()
    r_step, _, kind = rabbit_trainer()
    t_step, _ = torch_trainer()
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    for _ in range(warmup):
        r_step(x, t)
        t_step(xt, tt)
    r_times, t_times = [], []
    for _ in range(blocks):
        r_times += [median_time(lambda: r_step(x, t), 1) for _ in range(steps)]
        t_times += [median_time(lambda: t_step(xt, tt), 1) for _ in range(steps)]
    return BATCH / float(np.median(r_times)), BATCH / float(np.median(t_times)), kind


def conv_layer_speeds(make_passes, repeats):
    """Per conv layer of the reference net: (name, forward GFLOP/s, forward+backward GFLOP/s).

    ``make_passes(c_in, c_out, x, dy)`` builds one side's layer and returns its
    (forward, forward + backward) callables; forward + backward counts 3x the
    forward FLOPs.
    """
    rows = []
    rng = np.random.default_rng(0)
    for c_in, c_out, side in CONVS:
        flops = 2 * BATCH * c_out * c_in * 9 * side * side
        x = rng.standard_normal((BATCH, c_in, side, side)).astype(np.float32)
        dy = np.ones((BATCH, c_out, side, side), np.float32)
        forward, both = make_passes(c_in, c_out, x, dy)
        forward(), both()  # warm-up (compilation)
        rows.append((f"{c_in}->{c_out} @ {side}x{side}", flops / median_time(forward, repeats) / 1e9,
                     3 * flops / median_time(both, repeats) / 1e9))
    return rows


def rabbit_conv_layers(repeats):
    from rabbitkit.layers.conv2d import Conv2D

    def passes(c_in, c_out, x, dy):
        layer = Conv2D(c_in, c_out, 3, padding=1)
        return (lambda: layer.forward(x)), (lambda: (layer.forward(x), layer.backward(dy)))

    return conv_layer_speeds(passes, repeats)


def torch_conv_layers(repeats):
    import torch

    def passes(c_in, c_out, x, dy):
        conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        xt = torch.from_numpy(x).requires_grad_(True)
        dyt = torch.from_numpy(dy)

        def forward():
            with torch.no_grad():
                conv(xt)

        return forward, (lambda: conv(xt).backward(dyt))

    return conv_layer_speeds(passes, repeats)


def child_layers(side, repeats):
    """Per-layer speeds of one side alone (rabbitkit's process also measures numpy's matmul)."""
    if side == "torch":
        import torch

        torch.set_num_threads(numba_threads())
        print(json.dumps({"rows": torch_conv_layers(repeats)}))
    else:
        print(json.dumps({"matmul": matmul_gflops(repeats), "rows": rabbit_conv_layers(repeats)}))


def print_layer_table(matmul, rabbit_rows, torch_rows):
    print("| conv layer | rabbitkit fwd GFLOP/s | rabbitkit fwd+bwd | % of matmul (fwd+bwd) | PyTorch fwd | PyTorch fwd+bwd |")
    print("|---|---|---|---|---|---|")
    for (name, r_fwd, r_all), (_, t_fwd, t_all) in zip(rabbit_rows, torch_rows):
        print(f"| {name} | {r_fwd:.0f} | {r_all:.0f} | {100 * r_all / matmul:.0f}% | {t_fwd:.0f} | {t_all:.0f} |")


def blas_report():
    from threadpoolctl import threadpool_info

    return [f"{i.get('internal_api')} {i.get('version', '')} {os.path.basename(i['filepath'])}: "
            f"{i.get('num_threads')} threads, kernel {i.get('architecture', 'n/a')}"
            for i in threadpool_info()]


# -- subprocess roles --------------------------------------------------------------------
def peak_rss_mb():
    """This process's peak resident set (VmHWM: unlike ru_maxrss, not inherited across fork/exec)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_rss(side, steps):
    """Train alone for a few steps; print peak RSS (MB) and images/s as JSON."""
    x, t = batch_data()
    if side == "torch":
        import torch

        torch.set_num_threads(numba_threads())
        step, _ = torch_trainer()
        x, t = torch.from_numpy(x), torch.from_numpy(t)
    else:
        step, _, _ = rabbit_trainer()
    for _ in range(2):  # warm-up
        step(x, t)
    seconds = median_time(lambda: step(x, t), steps)
    print(json.dumps({"rss_mb": peak_rss_mb(), "images_per_s": BATCH / seconds}))


def child_startup():
    """Time import + model build and the first training step (compiles unless cached)."""
    start = time.perf_counter()
    step, _, _ = rabbit_trainer()
    x, t = batch_data()
    built = time.perf_counter()
    step(x, t)
    first = time.perf_counter()
    step(x, t)
    second = time.perf_counter()
    print(json.dumps({"import_build_s": built - start, "first_step_s": first - built, "second_step_s": second - first}))


def run_child(args, env=None):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def numba_threads():
    import numba

    return numba.get_num_threads()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short sanity run")
    parser.add_argument("--pairs", type=int, default=None,
                        help="alone training runs: process pairs, order alternating (default 5, quick 1)")
    parser.add_argument("--child", choices=["rss-rabbit", "rss-torch", "layers-rabbit", "layers-torch", "startup"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    removed = clean_environment()
    if args.child not in ("rss-torch", "layers-torch"):
        # Before numpy and before anything starts Numba's threads (numba_threads() below):
        # rabbitkit's OpenBLAS and OpenMP settings are read when those pools start.
        sys.path.insert(0, ROOT)
        import rabbitkit  # noqa: F401

    global np
    import numpy as np

    if args.child == "startup":
        return child_startup()
    if args.child and args.child.startswith("layers-"):
        return child_layers(args.child.split("-")[1], 3 if args.quick else 10)
    if args.child:
        return child_rss(args.child.split("-")[1], 3 if args.quick else 10)

    import torch

    torch.set_num_threads(numba_threads())
    blocks, steps, warmup, repeats = (2, 3, 2, 3) if args.quick else (5, 10, 5, 10)

    print("# Reference ConvNet: rabbitkit vs PyTorch CPU\n")
    print(f"command: python benchmarks/bench_convnet.py{' --quick' if args.quick else ''}")
    if removed:
        print(f"environment: removed {removed} for this run (a typical user's machine sets neither)")
    else:
        print("environment: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE not set")
    print(f"threads: Numba {numba_threads()}, torch {torch.get_num_threads()}; batch {BATCH}; torch {torch.__version__}")
    from rabbitkit.backend import tuning

    print(f"CPU: {tuning.cpu_model()}; kernel variants tuned: {tuning.enabled()} (RABBIT_TUNE)")
    matmul = matmul_gflops(repeats)
    rabbit_ips, torch_ips, kind = training_speed(blocks, steps, warmup)
    for line in blas_report():  # after training, so every library that ran is loaded
        print(f"BLAS: {line}")
    for key, record in tuning.known_choices().items():
        print(f"choice: {key} -> {record['choice']} "
              f"({', '.join(f'{n} {1e3 * t:.2f} ms' for n, t in record['seconds'].items())})")
    print(f"PyTorch: oneDNN convolutions {torch.backends.mkldnn.is_available()}, MKL {torch.backends.mkl.is_available()}")
    print(f"\nloss/optimizer on the rabbitkit side: {kind}\n")
    print("| training (fwd+bwd+SGD step) | images/s |")
    print("|---|---|")
    print(f"| rabbitkit | {rabbit_ips:,.0f} |")
    print(f"| PyTorch | {torch_ips:,.0f} |")
    print(f"| ratio rabbitkit / PyTorch | {rabbit_ips / torch_ips:.2f}x |")

    print(f"\nnumpy float32 matmul (2048^3): {matmul:.0f} GFLOP/s\n")
    print_layer_table(matmul, rabbit_conv_layers(repeats), torch_conv_layers(repeats))

    import rabbitkit

    # Each side alone in its own process: in this one, the two OpenMP runtimes and
    # BLAS pools slow each other down.  PyTorch's process gets the environment without
    # rabbitkit's thread settings (its OpenMP runtime is much slower with
    # OMP_WAIT_POLICY=PASSIVE).
    quick = ["--quick"] if args.quick else []
    layers = {side: run_child(["--child", f"layers-{side}"] + quick,
                              rabbitkit.foreign_environment() if side == "torch" else None)
              for side in ("rabbit", "torch")}
    print(f"\nthe same, each side alone in its own process; numpy matmul there: {layers['rabbit']['matmul']:.0f} GFLOP/s\n")
    print_layer_table(layers["rabbit"]["matmul"], layers["rabbit"]["rows"], layers["torch"]["rows"])
    pairs = args.pairs or (1 if args.quick else 5)
    alone = {"rabbit": [], "torch": []}
    for pair in range(pairs):
        for side in ("rabbit", "torch") if pair % 2 == 0 else ("torch", "rabbit"):
            alone[side].append(run_child(["--child", f"rss-{side}"] + quick,
                                         rabbitkit.foreign_environment() if side == "torch" else None))
    print(f"\n| training alone, own process ({pairs} pairs) | peak RSS MB, highest | images/s, per pair |")
    print("|---|---|---|")
    for side, name in (("rabbit", "rabbitkit"), ("torch", "PyTorch")):
        print(f"| {name} | {max(r['rss_mb'] for r in alone[side]):.0f} | "
              f"{' / '.join(format(r['images_per_s'], ',.0f') for r in alone[side])} |")
    ratios = [r["images_per_s"] / t["images_per_s"] for r, t in zip(alone["rabbit"], alone["torch"])]
    print(f"\nalone: rabbitkit / PyTorch training speed per pair {' / '.join(f'{q:.2f}x' for q in ratios)}; "
          f"median {statistics.median(ratios):.2f}x, lowest {min(ratios):.2f}x (goal >= 1.0x)")

    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        cold = run_child(["--child", "startup"], env)
        warm = run_child(["--child", "startup"], env)
    print("\n| rabbitkit start-up | import + build s | first step s | second step s |")
    print("|---|---|---|---|")
    print(f"| empty Numba cache (compiles) | {cold['import_build_s']:.2f} | {cold['first_step_s']:.2f} | {cold['second_step_s']:.3f} |")
    print(f"| warm start (cache=True) | {warm['import_build_s']:.2f} | {warm['first_step_s']:.2f} | {warm['second_step_s']:.3f} |")


if __name__ == "__main__":
    main()
