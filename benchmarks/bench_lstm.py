"""char-rnn training speed: rabbitkit against PyTorch CPU, same process, same threads.

    python benchmarks/bench_lstm.py            # full run (about a minute)
    python benchmarks/bench_lstm.py --quick    # short sanity run

The model (issue 6, Karpathy's char-rnn defaults): vocabulary 65 as one-hot
codes, a 2-layer LSTM with 128 units, a linear layer to 65 logits, softmax
cross-entropy over all (N, T) positions, Adam (lr 2e-3) and gradient clipping
to global norm 5; sequences of 50 characters, batch 32.  The hidden state is
carried between batches and detached (truncated BPTT) on both sides.

One training step = forward + backward + clipping + Adam update.  Both sides
run in alternating blocks in one process with the same thread count; the table
gives the median step time, sequences/s (batch / median) and the ratio.  Before
timing, the two models are given the same weights and their logits and
gradients on one batch are compared (max abs difference), so the numbers are
for the same computation.
"""
import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
if "pytorch" not in sys.argv:
    import rabbitkit  # noqa: F401  (before numpy, as the rabbit command does: OpenBLAS settings)

import numpy as np

VOCAB, HIDDEN, LAYERS, SEQ, BATCH = 65, 128, 2, 50, 32
LR, MAX_NORM = 2e-3, 5.0


def batches(count, seed=0):
    """Contiguous random character streams cut into (BATCH, SEQ) blocks with next-char targets."""
    rng = np.random.default_rng(seed)
    stream = rng.integers(0, VOCAB, (BATCH, count * SEQ + 1))
    return [(stream[:, k * SEQ:(k + 1) * SEQ].copy(), stream[:, k * SEQ + 1:(k + 1) * SEQ + 1].copy())
            for k in range(count)]


# -- rabbitkit ----------------------------------------------------------------------------
class RabbitSide:
    name = "rabbitkit"

    def __init__(self):
        import rabbitkit
        from rabbitkit.losses import SoftmaxCrossEntropy
        from rabbitkit.models.char_rnn import build_char_rnn
        from rabbitkit.optim import Adam, clip_grad_norm

        rabbitkit.manual_seed(0)
        self.model = build_char_rnn((VOCAB,), VOCAB, hidden_size=HIDDEN, num_layers=LAYERS)
        self.loss = SoftmaxCrossEntropy()
        self.optimizer = Adam(self.model.parameters(), lr=LR)
        self.clip = clip_grad_norm

    def step(self, x, y):
        self.optimizer.zero_grad()
        value = self.loss.forward(self.model.forward(x, training=True), y)
        self.model.backward(self.loss.backward())
        self.clip(self.model.parameters(), MAX_NORM)
        self.optimizer.step()
        return value


# -- PyTorch ------------------------------------------------------------------------------
class TorchSide:
    name = "pytorch"

    def __init__(self):
        import torch

        torch.manual_seed(0)
        self.torch = torch
        self.lstm = torch.nn.LSTM(VOCAB, HIDDEN, num_layers=LAYERS, batch_first=True)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)
        self.params = list(self.lstm.parameters()) + list(self.head.parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=LR)
        self.state = None

    def forward(self, x):
        torch = self.torch
        codes = torch.nn.functional.one_hot(torch.from_numpy(x), VOCAB).float()
        if self.state is not None:
            self.state = tuple(s.detach() for s in self.state)
        out, self.state = self.lstm(codes, self.state)
        return self.head(out)

    def step(self, x, y):
        torch = self.torch
        self.optimizer.zero_grad()
        logits = self.forward(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.from_numpy(y).reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_NORM)
        self.optimizer.step()
        return float(loss.detach())


def compare_numerics(rabbit, torch_side, x, y):
    """Load rabbitkit's weights into PyTorch; max |difference| of loss, logits and gradients."""
    torch = torch_side.torch
    state = rabbit.model.state_dict()
    torch_side.lstm.load_state_dict({k[2:]: torch.from_numpy(v.copy()) for k, v in state.items() if k.startswith("1.")})
    torch_side.head.load_state_dict({"weight": torch.from_numpy(state["2.weight"].copy()),
                                     "bias": torch.from_numpy(state["2.bias"].copy())})
    rabbit.model.reset_state()
    rabbit.model.zero_grad()
    logits = rabbit.model.forward(x, training=True)
    loss = rabbit.loss.forward(logits, y)
    rabbit.model.backward(rabbit.loss.backward())
    torch_side.state = None
    torch_side.optimizer.zero_grad()
    t_logits = torch_side.forward(x)
    t_loss = torch.nn.functional.cross_entropy(t_logits.reshape(-1, VOCAB), torch.from_numpy(y).reshape(-1))
    t_loss.backward()
    grads = dict(rabbit.model[1].grads)
    grad_diff = max(float(np.abs(grads[name] - p.grad.numpy()).max()) for name, p in torch_side.lstm.named_parameters())
    grad_diff = max(grad_diff, float(np.abs(rabbit.model[2].grads["weight"] - torch_side.head.weight.grad.numpy()).max()))
    rabbit.model.reset_state()
    rabbit.model.zero_grad()
    torch_side.state = None
    return {"loss": abs(loss - float(t_loss.detach())), "logits": float(np.abs(logits - t_logits.detach().numpy()).max()),
            "gradients": grad_diff}


def time_steps(side, data, count):
    times = []
    for k in range(count):
        x, y = data[k % len(data)]
        start = time.perf_counter()
        side.step(x, y)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short sanity run (few steps)")
    parser.add_argument("--threads", type=int, default=None, help="threads for both sides (default: all cores)")
    parser.add_argument("--blocks", type=int, default=None, help="alternating timing blocks per side")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per block")
    parser.add_argument("--pairs", type=int, default=None,
                        help="alone runs: process pairs, one per side, order alternating (default 5, quick 1)")
    parser.add_argument("--alone", choices=("rabbitkit", "pytorch"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    blocks = args.blocks or (2 if args.quick else 5)
    steps = args.steps or (5 if args.quick else 20)
    threads = args.threads or os.cpu_count()
    if args.alone:
        return time_alone(args, threads, blocks, steps)

    import numba
    import torch

    # rabbitkit manages its BLAS threads itself (see rabbitkit/backend/cpu.py): no limits here.
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)

    data = batches(max(steps, 8))
    rabbit, torch_side = RabbitSide(), TorchSide()
    diffs = compare_numerics(rabbit, torch_side, *data[0])

    start = time.perf_counter()
    rabbit.step(*data[0])  # compilation or cache load
    first_step = time.perf_counter() - start
    for side in (rabbit, torch_side):  # warm-up
        time_steps(side, data, 3)
    results = {rabbit.name: [], torch_side.name: []}
    for _ in range(blocks):
        for side in (rabbit, torch_side):
            results[side.name] += time_steps(side, data, steps)

    print(f"char-rnn training step: one-hot {VOCAB}, LSTM {LAYERS}x{HIDDEN}, seq {SEQ}, batch {BATCH}, "
          f"Adam + clip {MAX_NORM}; {threads} threads, {blocks} blocks x {steps} steps per side")
    from bench_mlp import describe_environment  # CPU, numpy/numba, BLAS pools, torch: as bench_mlp prints them

    from rabbitkit.backend import tuning

    print(describe_environment(torch))
    print(f"kernel BLAS: {tuning.blas_description()}; kernel choices: " + ("; ".join(f"{op} -> {choice}" for op, choice in sorted(tuning.used().items()))
                                or "none (tuning off or nothing to choose)"))
    print(f"numerics vs PyTorch on one batch (float32): |loss| {diffs['loss']:.2e}, "
          f"max |logits| {diffs['logits']:.2e}, max |grad| {diffs['gradients']:.2e}")
    print(f"rabbitkit first step (compile or cache load): {first_step:.2f} s\n")
    print("| side | median step (ms) | sequences/s |")
    print("|---|---:|---:|")
    medians = {}
    for name, times in results.items():
        medians[name] = float(np.median(times))
        print(f"| {name} | {medians[name] * 1e3:.2f} | {BATCH / medians[name]:,.0f} |")
    ratio = medians[torch_side.name] / medians[rabbit.name]
    print(f"\nsame process, interleaved: rabbitkit / PyTorch speed {ratio:.2f}x (goal >= 1.5x)")
    # The fair figure: each side alone in a fresh process (PyTorch's without rabbitkit or Numba,
    # so no second OpenMP runtime and none of rabbitkit's thread settings), in pairs whose
    # order alternates, since either side's speed drifts over minutes on a shared machine.
    pairs = args.pairs or (1 if args.quick else 5)
    alone = {"rabbitkit": [], "pytorch": []}
    for pair in range(pairs):
        for side in ("rabbitkit", "pytorch") if pair % 2 == 0 else ("pytorch", "rabbitkit"):
            command = [sys.executable, os.path.abspath(__file__), "--alone", side, "--threads", str(threads),
                       "--blocks", str(blocks), "--steps", str(steps)]
            env = rabbitkit.foreign_environment() if side == "pytorch" else None  # PyTorch's OpenMP as it comes
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
            alone[side].append(float(out.strip().splitlines()[-1]))
    ratios = [p / r for r, p in zip(alone["rabbitkit"], alone["pytorch"])]
    print(f"\n| side, alone in its own process ({pairs} pairs) | median step (ms), per pair | sequences/s, median |")
    print("|---|---:|---:|")
    for side, seconds in alone.items():
        print(f"| {side} | {' / '.join(f'{s * 1e3:.2f}' for s in seconds)} | {BATCH / np.median(seconds):,.0f} |")
    print(f"\nalone: rabbitkit / PyTorch speed per pair {' / '.join(f'{r:.2f}x' for r in ratios)}; "
          f"median {np.median(ratios):.2f}x, lowest {min(ratios):.2f}x (goal >= 1.5x)")
    # The bound: the step's products against this machine's own best float32 product rate.
    rate = {side: STEP_FLOP / np.median(seconds) / 1e9 for side, seconds in alone.items()}
    fastest_torch = min(alone["pytorch"])
    print(f"work: {STEP_FLOP / 1e9:.2f} GFLOP of products per step ({PYTORCH_EXTRA_FLOP / 1e9:.2f} more on PyTorch's "
          f"side, whose one-hot input is a dense product); rabbitkit {rate['rabbitkit']:.0f} GFLOP/s, "
          f"PyTorch {rate['pytorch']:.0f} GFLOP/s at their medians; numpy's 2048^3 float32 product "
          f"{matmul_gflops():.0f} GFLOP/s. 1.5x PyTorch's fastest pair ({fastest_torch * 1e3:.2f} ms) "
          f"takes {1.5 * STEP_FLOP / fastest_torch / 1e9:.0f} GFLOP/s.")


# Multiply-adds x 2 of one step's products, N*T rows each.  Forward: the second
# layer's input projection and both layers' recurrent products (the first layer's
# input projection of one-hot codes is a row gather); backward: both layers' h
# gradients and recurrent weight gradients, the second layer's input weight gradient
# and input gradient (the first's input gradient is not wanted, its weight gradient
# is a row scatter); and the head, forward, weight and input gradient.
_ROWS, _GATES = BATCH * SEQ, 4 * HIDDEN
STEP_FLOP = 2 * _ROWS * (9 * HIDDEN * _GATES + 3 * HIDDEN * VOCAB)
PYTORCH_EXTRA_FLOP = 2 * _ROWS * 2 * VOCAB * _GATES  # its one-hot layer: input projection, weight gradient


def matmul_gflops(size=2048, repeats=5):
    """numpy's float32 product rate (best of ``repeats``), the machine's practical peak."""
    a = np.random.default_rng(0).random((size, size), dtype=np.float32)
    out = np.empty_like(a)
    np.dot(a, a, out=out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.dot(a, a, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def time_alone(args, threads, blocks, steps):
    """Time one side in this process; print its median step time in seconds."""
    data = batches(max(steps, 8))
    if args.alone == "pytorch":
        import torch

        torch.set_num_threads(threads)
        side = TorchSide()
    else:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        side = RabbitSide()
    time_steps(side, data, 5)  # warm-up (compilation or cache load)
    times = []
    for _ in range(blocks):
        times += time_steps(side, data, steps)
    print(float(np.median(times)))


if __name__ == "__main__":
    main()
