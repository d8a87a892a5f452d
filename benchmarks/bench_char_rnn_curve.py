"""char-rnn learning curves: rabbitkit's `experiments/char_rnn.toml` against the same
model in PyTorch CPU, in one session, same data, same thread count.

    python benchmarks/bench_char_rnn_curve.py --epochs 15 [--corpus PATH] [--dropout 0.0]
    python benchmarks/bench_char_rnn_curve.py --epochs 14 --experiment char_rnn_annealed

The rabbitkit side runs ``experiments/<experiment>.toml`` (its optimizer, learning
rate and schedule); the PyTorch side always runs the issue's calibration recipe
(Adam 2e-3, constant), so with ``char_rnn_annealed`` the two curves differ by recipe
as well as by framework.

Both sides: Tiny Shakespeare split 90/5/5 (rabbitkit's `text` dataset), one-hot
input, 2 x LSTM 128, linear to the vocabulary, Adam 2e-3, gradient clipping at
global norm 5, 32 stateful streams of 50 characters (truncated BPTT), validation
loss over the whole validation split after every epoch.  Each side runs in its
own process, one after the other.  Printed per epoch: training seconds so far
(evaluation excluded on both sides), validation loss in nats/char and bits/char.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_CORPUS = os.path.join(ROOT, "..", "shared", "data", "text", "tinyshakespeare.txt")


def run_rabbitkit(args):
    import rabbitkit

    overrides = {"data.path": args.corpus, "train.epochs": args.epochs, "model.dropout": args.dropout,
                 "output.visualizers": [], "output.dir": args.out}
    result = rabbitkit.run(os.path.join(ROOT, "experiments", f"{args.experiment}.toml"), overrides, quiet=True)
    return [{"epoch": h["epoch"], "train_seconds": h["wall_seconds"], "val_loss": h["val_loss"]} for h in result.history]


def run_torch(args):
    import numba
    import torch

    from rabbitkit.data.datasets.text import load_text

    torch.set_num_threads(numba.get_num_threads())
    torch.manual_seed(0)
    data = load_text(args.corpus)
    vocab = len(data.vocab)

    class CharRNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(vocab, 128, num_layers=2, batch_first=True, dropout=args.dropout)
            self.head = torch.nn.Linear(128, vocab)

        def forward(self, x, state):
            out, state = self.lstm(torch.nn.functional.one_hot(x, vocab).float(), state)
            return self.head(out), state

    model = CharRNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def evaluate():
        model.eval()
        total, count, state = 0.0, 0, None
        with torch.no_grad():
            for x, y in data.stream_batches("val", 32, 50):
                logits, state = model(torch.from_numpy(x), state)
                total += loss_fn(logits.reshape(-1, vocab), torch.from_numpy(y).reshape(-1)).item() * y.size
                count += y.size
        model.train()
        return total / count

    history, seconds = [], 0.0
    for epoch in range(1, args.epochs + 1):
        state = None
        start = time.perf_counter()
        for x, y in data.stream_batches("train", 32, 50):
            if state is not None:
                state = tuple(s.detach() for s in state)
            logits, state = model(torch.from_numpy(x), state)
            loss = loss_fn(logits.reshape(-1, vocab), torch.from_numpy(y).reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
        seconds += time.perf_counter() - start
        history.append({"epoch": epoch, "train_seconds": seconds, "val_loss": evaluate()})
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--corpus", default=DEFAULT_CORPUS)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--out", default="/tmp/rabbit-bench-runs")
    parser.add_argument("--experiment", default="char_rnn", help="rabbitkit's experiment file in experiments/ (no .toml)")
    parser.add_argument("--side", choices=("rabbitkit", "torch"))
    args = parser.parse_args()
    args.corpus = os.path.abspath(args.corpus)
    if args.side:  # a child process: run one side, print JSON
        print(json.dumps((run_rabbitkit if args.side == "rabbitkit" else run_torch)(args)))
        return
    curves = {}
    for side in ("rabbitkit", "torch"):
        command = [sys.executable, __file__, "--side", side, "--epochs", str(args.epochs), "--corpus", args.corpus,
                   "--dropout", str(args.dropout), "--out", args.out, "--experiment", args.experiment]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        curves[side] = json.loads(done.stdout.strip().splitlines()[-1])
    print("| epoch | rabbitkit s | rabbitkit val nats (bits) | PyTorch s | PyTorch val nats (bits) |")
    print("|---|---|---|---|---|")
    for ours, theirs in zip(curves["rabbitkit"], curves["torch"]):
        print(f"| {ours['epoch']} | {ours['train_seconds']:.0f} | {ours['val_loss']:.3f} ({ours['val_loss'] / math.log(2):.2f}) "
              f"| {theirs['train_seconds']:.0f} | {theirs['val_loss']:.3f} ({theirs['val_loss'] / math.log(2):.2f}) |")
    for side, curve in curves.items():
        best = min(curve, key=lambda h: h["val_loss"])
        print(f"{side}: best validation loss {best['val_loss']:.3f} nats/char ({best['val_loss'] / math.log(2):.3f} bits) "
              f"at epoch {best['epoch']}, after {best['train_seconds']:.0f} s of training")


if __name__ == "__main__":
    main()
