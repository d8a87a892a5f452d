"""Training steps per second of rabbitkit vs PyTorch CPU on two MLPs, in one run.

    python benchmarks/bench_mlp.py            # full run (a few minutes)
    python benchmarks/bench_mlp.py --quick    # short sanity run

Cases (issue 2):
  (a) 1-64-64-1 tanh MLP, batch 256, squared error, SGD        goal >= 3x PyTorch
  (b) 784-256-256-10 ReLU MLP, batch 128, cross-entropy, SGD momentum 0.9   goal >= 1x

One training step is zero_grad, forward, loss, backward, optimizer step on a fixed
batch (no data loading).  PyTorch runs at the same thread count as Numba
(torch.set_num_threads(numba.get_num_threads())).  Both are warmed up first (Numba
compiles or loads its cache), then timed in interleaved repetitions so machine
noise hits both alike; medians are reported.  Benchmark-only dependency: torch.

Two measurements per case: both frameworks interleaved in this process, and each
framework alone in a fresh process (``--alone``, run automatically one after the
other).  The "alone" figures are the fair ones: in one process each side's thread
pools (Numba's and PyTorch's OpenMP, two OpenBLAS libraries) slow the other.  On a
shared machine the speed of either side drifts over minutes (PyTorch's tiny-MLP
step moved 350-1,360 steps/s in one hour), so the alone runs come in ``--pairs``
(default 5): a rabbitkit process and a PyTorch process one after the other, the
order alternating, and the figure is the median of the pairs' ratios.

rabbitkit is imported before numpy, so its OpenBLAS settings apply (see
rabbitkit/__init__.py and rabbitkit/backend/cpu.py); the PyTorch-alone process never
imports rabbitkit, so none of rabbitkit's thread settings reach PyTorch there.
``--blas-threads N`` limits every BLAS pool for experiments.
"""
import sys

if "pytorch" not in sys.argv:
    import rabbitkit  # noqa: F401  (before numpy: sets OPENBLAS_THREAD_TIMEOUT)
import argparse
import json
import statistics
import subprocess
import time

import numpy as np

from machine import cpu_model

ALONE_RESULT = "alone-result "  # the line an --alone process ends with (JSON: case -> steps/s)

CASES = {
    "a": dict(title="(a) 1-64-64-1 tanh, batch 256, squared error, SGD", sizes=(1, 64, 64, 1), activation="tanh",
              batch=256, loss="squared_error", momentum=0.0, lr=0.01, goal=3.0),
    "b": dict(title="(b) 784-256-256-10 ReLU, batch 128, cross-entropy, SGD momentum", sizes=(784, 256, 256, 10),
              activation="relu", batch=128, loss="cross_entropy", momentum=0.9, lr=0.01, goal=1.0),
}


def make_batch(case, seed=0):
    rng = np.random.default_rng(seed)
    inputs, outputs = case["sizes"][0], case["sizes"][-1]
    if case["loss"] == "squared_error":
        x = rng.uniform(-1, 1, (case["batch"], inputs)).astype(np.float32)
        t = np.sin(3 * x[:, :outputs]).astype(np.float32)
    else:
        x = rng.standard_normal((case["batch"], inputs)).astype(np.float32)
        t = rng.integers(0, outputs, case["batch"])
    return x, t


def rabbitkit_step_fn(case, x, t):
    import rabbitkit
    from rabbitkit.layers.activations import ReLU, Tanh
    from rabbitkit.layers.dense import Dense
    from rabbitkit.losses import SoftmaxCrossEntropy, SquaredError
    from rabbitkit.optim import SGD

    rabbitkit.manual_seed(0)
    activation = {"tanh": Tanh, "relu": ReLU}[case["activation"]]
    sizes = case["sizes"]
    layers = []
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Dense(n_in, n_out))
        if index < len(sizes) - 2:
            layers.append(activation())
    model = rabbitkit.Sequential(layers)
    # As the trainer does (Trainer.__init__): nothing uses the gradient w.r.t. the data,
    # and PyTorch's autograd does not compute it either (the input needs no grad).
    model.skip_input_grad()
    loss = SquaredError() if case["loss"] == "squared_error" else SoftmaxCrossEntropy()
    opt = SGD(model.parameters(), lr=case["lr"], momentum=case["momentum"])

    def step():
        model.zero_grad()
        value = loss.forward(model.forward(x), t)
        model.backward(loss.backward())
        opt.step()
        return value

    return step


def torch_step_fn(case, x, t):
    import torch

    torch.manual_seed(0)
    activation = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[case["activation"]]
    sizes = case["sizes"]
    layers = []
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(n_in, n_out))
        if index < len(sizes) - 2:
            layers.append(activation())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=case["lr"], momentum=case["momentum"])
    tx = torch.from_numpy(x)
    tt = torch.from_numpy(t)
    batch = case["batch"]
    if case["loss"] == "squared_error":
        def loss_fn(y):
            return 0.5 * ((y - tt) ** 2).sum() / batch
    else:
        criterion = torch.nn.CrossEntropyLoss()
        tt = tt.long()

        def loss_fn(y):
            return criterion(y, tt)

    def step():
        opt.zero_grad(set_to_none=False)
        value = loss_fn(model(tx))
        value.backward()
        opt.step()
        return value.item()

    return step


def time_steps(step, steps):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def describe_environment(torch, with_numba=True):
    model = cpu_model()  # benchmarks/machine.py: rabbitkit's name for it, rabbitkit not imported
    lines = [f"CPU: {model}", f"python {sys.version.split()[0]}, numpy {np.__version__}"]
    if with_numba:
        import numba

        lines[1] += (f", numba {numba.__version__} (threads {numba.get_num_threads()}, "
                     f"layer {numba.config.THREADING_LAYER})")
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            lines.append(f"  pool: {info.get('internal_api')} {info.get('version', '')} {info.get('architecture', '')} "
                         f"threads={info['num_threads']} ({info['filepath'].rsplit('/', 1)[-1]})")
    except ImportError:
        lines.append("  (install threadpoolctl to list the BLAS libraries in use)")
    if torch is not None:
        lines.append(f"torch {torch.__version__} threads {torch.get_num_threads()}; "
                     f"{torch.__config__.parallel_info().splitlines()[0] if hasattr(torch, '__config__') else ''}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short sanity run (numbers not meaningful)")
    parser.add_argument("--cases", default="ab", help="which cases to run, e.g. 'a' (default 'ab')")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per framework")
    parser.add_argument("--seconds", type=float, default=None, help="approximate length of one repetition")
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="limit the BLAS pools (numpy/scipy OpenBLAS) to this many threads")
    parser.add_argument("--alone", choices=("rabbitkit", "pytorch"),
                        help="time one framework only, in this process (used for the 'alone' runs)")
    parser.add_argument("--pairs", type=int, default=None,
                        help="alone runs: process pairs, one per side, order alternating (default 5, quick 1)")
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None and args.alone != "pytorch":
        import numba

        args.threads = numba.get_num_threads()
    main_interleaved(args)
    if args.alone is None:
        alone_pairs(args)


def alone_pairs(args):
    """Each side alone in its own process, ``--pairs`` times; per case the pairs' rates
    and ratios, and the median ratio (the figure to trust on a noisy machine)."""
    pairs = args.pairs or (1 if args.quick else 5)
    rates = {key: {"rabbitkit": [], "pytorch": []} for key in args.cases}
    for pair in range(pairs):
        for side in ("rabbitkit", "pytorch") if pair % 2 == 0 else ("pytorch", "rabbitkit"):
            # The PyTorch process imports neither rabbitkit nor Numba: no second OpenMP
            # runtime and none of rabbitkit's thread settings reach it.
            command = [sys.executable, __file__, "--alone", side, "--cases", args.cases, "--threads", str(args.threads)]
            command += ["--quick"] if args.quick else []
            command += ["--repeats", str(args.repeats)] if args.repeats else []
            command += ["--seconds", str(args.seconds)] if args.seconds else []
            command += ["--blas-threads", str(args.blas_threads)] if args.blas_threads is not None else []
            env = rabbitkit.foreign_environment() if side == "pytorch" else None
            output = subprocess.run(command, check=True, env=env, capture_output=True, text=True).stdout
            lines = output.splitlines()
            if pair == 0:  # the environment and the first pair's details, once per side
                print(f"-- {side} alone in its own process --")
                print("\n".join(line for line in lines if not line.startswith(ALONE_RESULT)), flush=True)
            result = json.loads(next(line for line in lines if line.startswith(ALONE_RESULT))[len(ALONE_RESULT):])
            for key, rate in result.items():
                rates[key][side].append(rate)
    print(f"\n-- alone, {pairs} process pair(s), order alternating: steps/s per pair --")
    for key in args.cases:
        case, sides = CASES[key], rates[key]
        ratios = [r / p for r, p in zip(sides["rabbitkit"], sides["pytorch"])]
        median = statistics.median(ratios)
        verdict = "meets" if median >= case["goal"] else "below"
        print(case["title"])
        for name in ("rabbitkit", "pytorch"):
            print(f"  {name:9s} " + " / ".join(f"{rate:,.0f}" for rate in sides[name]))
        print("  ratios    " + " / ".join(f"{ratio:.2f}x" for ratio in ratios)
              + f"; median {median:.2f}x, lowest {min(ratios):.2f}x ({verdict} the goal of {case['goal']:g}x)")


def main_interleaved(args):
    repeats = args.repeats or (3 if args.quick else 7)
    seconds = args.seconds or (0.2 if args.quick else 1.0)

    torch = None
    if args.alone != "rabbitkit":
        # Alone means alone: rabbitkit's process does not even load PyTorch.
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    if args.alone != "pytorch":
        # Load every BLAS library (numpy's, and scipy's used by Numba's np.dot) before
        # limiting or describing them.
        import scipy.linalg.blas  # noqa: F401
        import scipy.linalg.cython_blas  # noqa: F401

    if args.blas_threads is not None:
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.blas_threads, user_api="blas")
    print(describe_environment(torch, with_numba=args.alone != "pytorch"))
    if args.quick:
        print("quick run: a sanity check, the numbers are not meaningful")
    results = {}
    for key in args.cases:
        case = CASES[key]
        x, t = make_batch(case)
        steps = {}
        if args.alone in (None, "rabbitkit"):
            steps["rabbitkit"] = rabbitkit_step_fn(case, x, t)
        if torch is not None and args.alone in (None, "pytorch"):
            steps["pytorch"] = torch_step_fn(case, x, t)
        print(case["title"])
        # Warm-up: compiles (or loads cached) kernels, primes allocators and caches.
        counts = {}
        for name, step in steps.items():
            start = time.perf_counter()
            first = step()
            compile_s = time.perf_counter() - start
            for _ in range(20):
                step()
            rate = time_steps(step, 20)
            counts[name] = max(10, int(rate * seconds))
            print(f"  {name:9s} first step {compile_s:6.2f} s, initial loss {first:.4f}")
        rates = {name: [] for name in steps}
        for _ in range(repeats):
            for name, step in steps.items():  # interleaved
                rates[name].append(time_steps(step, counts[name]))
        medians = {name: statistics.median(values) for name, values in rates.items()}
        for name, values in rates.items():
            spread = f"{min(values):,.0f}-{max(values):,.0f}"
            print(f"  {name:9s} {medians[name]:10,.0f} steps/s (median of {repeats}, range {spread}), "
                  f"loss now {steps[name]():.4f}")
        results[key] = medians.get(args.alone)
        if "pytorch" in medians and "rabbitkit" in medians:
            ratio = medians["rabbitkit"] / medians["pytorch"]
            verdict = "meets" if ratio >= case["goal"] else "below"
            print(f"  ratio rabbitkit/pytorch {ratio:.2f}x ({verdict} the goal of {case['goal']:g}x)")

    if args.alone is not None:  # for the parent's pairs: each case's median steps/s
        print(ALONE_RESULT + json.dumps(results))


if __name__ == "__main__":
    main()
