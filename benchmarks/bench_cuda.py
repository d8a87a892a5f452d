"""rabbitkit's CUDA path on a real GPU against PyTorch CUDA (one call, under 5 minutes).

    python benchmarks/bench_cuda.py              # everything (about 2-3 minutes on an H100/H200)
    python benchmarks/bench_cuda.py --quick      # fewer steps, a sanity run
    python benchmarks/bench_cuda.py --json out.json

Reports, as markdown tables:

* the backend GEMM's GFLOP/s (square products and the reference ConvNet's conv
  products as lowered to the GEMM) against the device's fp32 peak without tensor
  cores (from its SM count and clock: 128 fp32 lanes per SM, 2 flops per FMA;
  an H200 is about 67 TFLOP/s) and against PyTorch's matmul (cuBLAS, TF32 off);
* the reference ConvNet's training step (bench_convnet.py's net: 32x32x3 input,
  four 3x3 convs, two max-pools, fc 4096-256-43, dropout, batch 64, SGD momentum)
  on both, images/s and the ratio;
* the char-rnn step (bench_lstm.py's model: one-hot 65, 2-layer LSTM 128, batch
  32 x 50, Adam, clipping to norm 5) on both (a net with a layer that has no CUDA
  kernels, a plugin's say, gets a line saying it is skipped);
* peak device memory of each side for each net: rabbitkit's as the bytes its
  arrays hold at most (every numba.cuda allocation counted until its array is
  freed), PyTorch's as ``torch.cuda.max_memory_allocated``.

Both sides get the batch as host (numpy) arrays every step and move it to the
device themselves, as the trainer does; a step is timed to its end
(synchronised).  Medians of alternating blocks.  Without a GPU it says so and
exits with status 2; without PyTorch (or PyTorch without CUDA) it reports
rabbitkit alone.
"""
import argparse
import json
import os
import statistics
import sys
import time
import weakref

os.environ["NUMBA_ENABLE_CUDASIM"] = "0"  # this measures the real device, never the simulator
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

FP32_LANES_PER_SM = 128  # Volta and later (Hopper: 128 fp32 cores per SM)


def gpu_or_exit():
    """numba.cuda with a device, or a clear message and exit status 2."""
    try:
        from numba import cuda
    except ImportError as err:
        print(f"bench_cuda: numba.cuda is not installed (pip install rabbitkit[cuda]): {err}")
        sys.exit(2)
    try:
        available = cuda.is_available()
    except Exception as err:  # driver problems
        available = False
        print(f"bench_cuda: the CUDA driver failed: {err}")
    if not available:
        print("bench_cuda: no CUDA GPU or driver found; this benchmark needs a real device "
              "(the simulator, NUMBA_ENABLE_CUDASIM=1, is only for tests)")
        sys.exit(2)
    return cuda


def device_report(cuda):
    device = cuda.get_current_device()
    name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    sms = device.MULTIPROCESSOR_COUNT
    clock_hz = device.CLOCK_RATE * 1e3  # kHz
    peak = sms * FP32_LANES_PER_SM * 2 * clock_hz
    free, total = cuda.current_context().get_memory_info()
    return {"name": name, "compute_capability": ".".join(map(str, device.compute_capability)), "sms": sms,
            "clock_ghz": clock_hz / 1e9, "fp32_peak_tflops": peak / 1e12, "memory_gib": total / 2**30}


class AllocationMeter:
    """Bytes held by numba.cuda arrays: every allocation of the current context is
    counted until the array (its memory pointer) is released; ``peak`` the most."""

    def __init__(self, cuda):
        self.context = cuda.current_context()
        self.live = 0
        self.peak = 0
        original = self.context.memalloc

        def memalloc(size, *args, **kwargs):
            pointer = original(size, *args, **kwargs)
            self.live += size
            self.peak = max(self.peak, self.live)
            try:
                weakref.finalize(pointer, self._release, size)
            except TypeError:  # a pointer type without weak references: count it as held
                pass
            return pointer

        self.context.memalloc = memalloc

    def _release(self, size):
        self.live -= size

    def reset(self):
        import gc

        gc.collect()
        self.peak = self.live


def torch_cuda():
    """torch with CUDA, or None (and why)."""
    try:
        import torch
    except ImportError:
        return None, "PyTorch is not installed"
    if not torch.cuda.is_available():
        return None, "PyTorch has no CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    return torch, None


def timed(step, sync, steps):
    """Seconds per call of ``step`` (each call timed to its end)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


# -- GEMM ------------------------------------------------------------------------------
def gemm_rows(backend, torch, repeats):
    """(label, m, n, k, rabbitkit GFLOP/s, torch GFLOP/s) for square and conv-shaped products."""
    # conv products of the reference net at batch 64 as the CUDA path lowers them:
    # forward W (O, C*9) @ cols (C*9, B*P); weight gradient rows (O, B*P) @ cols.T
    shapes = [("square 1024", 1024, 1024, 1024, False, False), ("square 2048", 2048, 2048, 2048, False, False),
              ("square 4096", 4096, 4096, 4096, False, False),
              ("conv 32->32 fwd", 32, 64 * 1024, 288, False, False), ("conv 64->64 fwd", 64, 64 * 256, 576, False, False),
              ("conv 64->64 dW", 64, 576, 64 * 256, False, True), ("conv 64->64 dcols", 576, 64 * 256, 64, True, False),
              ("fc 4096->256 fwd", 64, 256, 4096, False, True)]
    rng = np.random.default_rng(0)
    rows = []
    for label, m, n, k, trans_a, trans_b in shapes:
        a_host = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
        b_host = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
        a, b = backend.asarray(a_host), backend.asarray(b_host)
        c = backend.empty((m, n), np.float32)
        backend.gemm(a, b, c, trans_a, trans_b)  # compile
        backend.synchronize()
        seconds = statistics.median(timed(lambda: backend.gemm(a, b, c, trans_a, trans_b), backend.synchronize,
                                          repeats))
        ours = 2 * m * n * k / seconds / 1e9
        # the product is right (a spot check against numpy in float64)
        expected = (a_host.T if trans_a else a_host).astype(np.float64)[:4] @ (b_host.T if trans_b else b_host)
        error = float(np.max(np.abs(c.copy_to_host()[:4] - expected)) / max(1.0, np.max(np.abs(expected))))
        theirs = None
        if torch is not None:
            ta = torch.from_numpy(a_host).cuda()
            tb = torch.from_numpy(b_host).cuda()
            op_a = ta.t() if trans_a else ta
            op_b = tb.t() if trans_b else tb
            torch.matmul(op_a, op_b)
            torch.cuda.synchronize()
            seconds = statistics.median(timed(lambda: torch.matmul(op_a, op_b), torch.cuda.synchronize, repeats))
            theirs = 2 * m * n * k / seconds / 1e9
        rows.append({"product": label, "m": m, "n": n, "k": k, "rabbitkit_gflops": ours, "torch_gflops": theirs,
                     "relative_error": error})
    return rows


# -- the two nets -----------------------------------------------------------------------
def convnet_sides(torch, batch):
    """((name, step, sync, memory) for rabbitkit, and for torch or None), or a skip reason."""
    import bench_convnet

    import rabbitkit
    from rabbitkit.losses import SoftmaxCrossEntropy
    from rabbitkit.optim import SGD

    rabbitkit.manual_seed(0)
    model = bench_convnet.rabbit_net()
    if not model.supports_cuda():
        missing = ", ".join(sorted(set(model._layers_without_cuda())))
        return None, f"skipped: {missing} has no CUDA kernels"
    model.to("cuda")
    model.skip_input_grad()
    loss = SoftmaxCrossEntropy()
    optimizer = SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    t = rng.integers(0, bench_convnet.CLASSES, batch)

    def rabbit_step():
        optimizer.zero_grad()
        value = loss.forward(model.forward(x, training=True), t)
        model.backward(loss.backward())
        optimizer.step()
        return value

    sides = [("rabbitkit", rabbit_step)]
    if torch is not None:
        torch.manual_seed(0)
        net = bench_convnet.torch_net().cuda()
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def torch_step():
            opt.zero_grad(set_to_none=False)
            out = net(torch.from_numpy(x).cuda(non_blocking=False))
            value = torch.nn.functional.cross_entropy(out, torch.from_numpy(t).cuda())
            value.backward()
            opt.step()
            return float(value)  # the scalar loss comes back, as rabbitkit's does

        sides.append(("pytorch", torch_step))
    return sides, None


def char_rnn_sides(torch):
    import bench_lstm

    import rabbitkit
    from rabbitkit.losses import SoftmaxCrossEntropy
    from rabbitkit.models.char_rnn import build_char_rnn
    from rabbitkit.optim import Adam, clip_grad_norm

    rabbitkit.manual_seed(0)
    model = build_char_rnn((bench_lstm.VOCAB,), bench_lstm.VOCAB, hidden_size=bench_lstm.HIDDEN,
                           num_layers=bench_lstm.LAYERS)
    if not model.supports_cuda():
        missing = ", ".join(sorted(set(model._layers_without_cuda())))
        return None, f"skipped: {missing} has no CUDA kernels"
    model.to("cuda")
    loss = SoftmaxCrossEntropy()
    optimizer = Adam(model.parameters(), lr=bench_lstm.LR)
    data = bench_lstm.batches(64)
    position = {"rabbit": 0, "torch": 0}

    def rabbit_step():
        x, y = data[position["rabbit"] % len(data)]
        position["rabbit"] += 1
        optimizer.zero_grad()
        value = loss.forward(model.forward(x, training=True), y)
        model.backward(loss.backward())
        clip_grad_norm(model.parameters(), bench_lstm.MAX_NORM)
        optimizer.step()
        return value

    sides = [("rabbitkit", rabbit_step)]
    if torch is not None:
        torch.manual_seed(0)
        vocab = bench_lstm.VOCAB
        lstm = torch.nn.LSTM(vocab, bench_lstm.HIDDEN, num_layers=bench_lstm.LAYERS, batch_first=True).cuda()
        head = torch.nn.Linear(bench_lstm.HIDDEN, vocab).cuda()
        params = list(lstm.parameters()) + list(head.parameters())
        opt = torch.optim.Adam(params, lr=bench_lstm.LR)
        state = {"hidden": None}

        def torch_step():
            x, y = data[position["torch"] % len(data)]
            position["torch"] += 1
            opt.zero_grad()
            codes = torch.nn.functional.one_hot(torch.from_numpy(x).cuda(), vocab).float()
            if state["hidden"] is not None:
                state["hidden"] = tuple(s.detach() for s in state["hidden"])
            out, state["hidden"] = lstm(codes, state["hidden"])
            value = torch.nn.functional.cross_entropy(head(out).reshape(-1, vocab), torch.from_numpy(y).cuda().reshape(-1))
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, bench_lstm.MAX_NORM)
            opt.step()
            return float(value)

        sides.append(("pytorch", torch_step))
    return sides, None


def compare_steps(sides, backend, torch, meter, warmup, blocks, steps):
    """Median seconds per step and peak device memory (MiB) of each side."""
    results = {}
    sync = {"rabbitkit": backend.synchronize, "pytorch": torch.cuda.synchronize if torch is not None else None}
    for name, step in sides:  # warm-up: compilation, cuDNN autotuning; then the memory of one step
        for _ in range(warmup):
            step()
        sync[name]()
        if name == "rabbitkit":
            meter.reset()
            step()
            sync[name]()
            memory = meter.peak / 2**20
        else:
            torch.cuda.reset_peak_memory_stats()
            step()
            sync[name]()
            memory = torch.cuda.max_memory_allocated() / 2**20
        results[name] = {"times": [], "peak_mib": memory}
    for _ in range(blocks):
        for name, step in sides:
            results[name]["times"] += timed(step, sync[name], steps)
    for name in results:
        results[name]["median_s"] = statistics.median(results[name].pop("times"))
    return results


def print_steps(title, results, batch, unit):
    print(f"\n### {title}\n")
    print(f"| side | ms / step | {unit} / s | peak device memory (MiB) |")
    print("|---|---:|---:|---:|")
    for name, row in results.items():
        print(f"| {name} | {row['median_s'] * 1e3:.2f} | {batch / row['median_s']:,.0f} | {row['peak_mib']:,.1f} |")
    if "pytorch" in results:
        ratio = results["pytorch"]["median_s"] / results["rabbitkit"]["median_s"]
        print(f"\nrabbitkit / PyTorch speed: {ratio:.2f}x (goal: at least 0.5x)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cuda = gpu_or_exit()
    from rabbitkit.backend import get_backend

    backend = get_backend("cuda")
    meter = AllocationMeter(cuda)
    torch, why_not = torch_cuda()
    device = device_report(cuda)
    print(f"device: {device['name']} (compute {device['compute_capability']}, {device['sms']} SMs at "
          f"{device['clock_ghz']:.2f} GHz, {device['memory_gib']:.0f} GiB); fp32 peak without tensor cores "
          f"{device['fp32_peak_tflops']:.1f} TFLOP/s")
    if torch is None:
        print(f"PyTorch: {why_not}; rabbitkit alone")
    else:
        print(f"PyTorch {torch.__version__} (cuBLAS / cuDNN, TF32 off)")
    repeats, warmup, blocks, steps = (5, 2, 2, 5) if args.quick else (20, 3, 3, 20)
    report = {"device": device}

    gemm = gemm_rows(backend, torch, repeats)
    report["gemm"] = gemm
    peak = device["fp32_peak_tflops"] * 1e3
    print("\n### GEMM (fp32)\n")
    print("| product | m x n x k | rabbitkit GFLOP/s | % of peak | PyTorch GFLOP/s | rel. error |")
    print("|---|---|---:|---:|---:|---:|")
    for row in gemm:
        theirs = f"{row['torch_gflops']:,.0f}" if row["torch_gflops"] else "-"
        print(f"| {row['product']} | {row['m']} x {row['n']} x {row['k']} | {row['rabbitkit_gflops']:,.0f} | "
              f"{100 * row['rabbitkit_gflops'] / peak:.1f}% | {theirs} | {row['relative_error']:.1e} |")

    for key, title, build, batch, unit in (
        ("convnet", "ConvNet training step (batch 64)", lambda: convnet_sides(torch, 64), 64, "images"),
        ("char_rnn", "char-rnn training step (batch 32 x 50)", lambda: char_rnn_sides(torch), 32, "sequences"),
    ):
        sides, skipped = build()
        if skipped:
            print(f"\n### {title}\n\n{skipped}")
            report[key] = {"skipped": skipped}
            continue
        results = compare_steps(sides, backend, torch, meter, warmup, blocks, steps)
        report[key] = results
        print_steps(title, results, batch, unit)

    seconds = time.perf_counter() - started
    print(f"\n(total {seconds:.0f} s)")
    report["seconds"] = seconds
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
