"""Cross-check the model-zoo nets against PyTorch, and time loading a VGG-16-sized .pth.

For each architecture: build the torch reference (plain ``torch.nn`` in
torchvision's exact layout, written out below since torchvision is not
installed beside this torch), give it random weights (batch-norm statistics
too) in eval mode, ``torch.save`` its state_dict (zip format), load that file
with ``rabbitkit.pretrained.load`` (rabbitkit's own pickle reader: nothing from
the file runs), and compare the logits of one random 224x224 image in float32:
relative difference = max |rabbitkit - torch| / max |torch|.

``bvlc_googlenet`` has no torchvision module: its reference is the Caffe net in
torch (LRN, ceil-mode pools, biases) with rabbitkit's parameter names.

    cd /work/wt-zoo && /work/venv-torch/bin/python benchmarks/check_zoo_torch.py [ARCH ...] [--load-timing]

``--load-timing`` measures, in fresh subprocesses, the time and peak memory
(VmHWM above the RSS after imports) of reading a VGG-16 .pth and of
``pretrained.load`` (read + build + copy into the model).
"""
import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's rabbitkit, not an installed one
from torch import nn


# -- torchvision's modules, as in torchvision/models/*.py ---------------------------------
def vgg_torch(cfg):
    layers, cin = [], 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
                                            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(), nn.Linear(4096, 1000))

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return VGG()


class AlexNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(True), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 36, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Linear(4096, 1000))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class Fire(nn.Module):
    def __init__(self, cin, squeeze, e1, e3):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.squeeze_activation = nn.ReLU(True)
        self.expand1x1 = nn.Conv2d(squeeze, e1, 1)
        self.expand1x1_activation = nn.ReLU(True)
        self.expand3x3 = nn.Conv2d(squeeze, e3, 3, padding=1)
        self.expand3x3_activation = nn.ReLU(True)

    def forward(self, x):
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1)


class SqueezeNet11(nn.Module):
    def __init__(self):
        super().__init__()
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(True), pool(), Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), pool(),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), pool(), Fire(256, 48, 192, 192), Fire(384, 48, 192, 192),
            Fire(384, 64, 256, 256), Fire(512, 64, 256, 256))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, 1000, 1), nn.ReLU(True), nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pp):
        super().__init__()
        self.branch1 = BasicConv2d(cin, c1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(cin, c3r, kernel_size=1), BasicConv2d(c3r, c3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(cin, c5r, kernel_size=1), BasicConv2d(c5r, c5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), BasicConv2d(cin, pp, kernel_size=1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.conv = BasicConv2d(cin, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, 1000)


WIDTHS = {"3a": (192, 64, 96, 128, 16, 32, 32), "3b": (256, 128, 128, 192, 32, 96, 64),
          "4a": (480, 192, 96, 208, 16, 48, 64), "4b": (512, 160, 112, 224, 24, 64, 64),
          "4c": (512, 128, 128, 256, 24, 64, 64), "4d": (512, 112, 144, 288, 32, 64, 64),
          "4e": (528, 256, 160, 320, 32, 128, 128), "5a": (832, 256, 160, 320, 32, 128, 128),
          "5b": (832, 384, 192, 384, 48, 128, 128)}


class GoogLeNet(nn.Module):
    """torchvision's GoogLeNet(aux_logits=True, transform_input=True), as the published file is built."""

    def __init__(self):
        super().__init__()
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a, self.inception3b = Inception(*WIDTHS["3a"]), Inception(*WIDTHS["3b"])
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        for key in ("4a", "4b", "4c", "4d", "4e"):
            setattr(self, f"inception{key}", Inception(*WIDTHS[key]))
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a, self.inception5b = Inception(*WIDTHS["5a"]), Inception(*WIDTHS["5b"])
        self.aux1, self.aux2 = InceptionAux(512), InceptionAux(528)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1024, 1000)

    def forward(self, x):  # eval mode: the aux heads do not run
        x = torch.cat([x[:, 0:1] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5, x[:, 1:2] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5,
                       x[:, 2:3] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5], 1)
        x = self.maxpool2(self.conv3(self.conv2(self.maxpool1(self.conv1(x)))))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        for key in ("4a", "4b", "4c", "4d", "4e"):
            x = getattr(self, f"inception{key}")(x)
        x = self.inception5b(self.inception5a(self.maxpool4(x)))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


# -- BVLC GoogLeNet's Caffe net in torch, under rabbitkit's names ---------------------------------
class CaffeInception(nn.Module):
    def __init__(self, cin, c1, c3r, c3, c5r, c5, pp):
        super().__init__()
        conv = lambda a, b, k: nn.Conv2d(a, b, k, padding=k // 2)  # noqa: E731
        self.branch1 = nn.ModuleDict({"1x1": conv(cin, c1, 1)})
        self.branch2 = nn.ModuleDict({"3x3_reduce": conv(cin, c3r, 1), "3x3": conv(c3r, c3, 3)})
        self.branch3 = nn.ModuleDict({"5x5_reduce": conv(cin, c5r, 1), "5x5": conv(c5r, c5, 5)})
        self.branch4 = nn.ModuleDict({"pool_proj": conv(cin, pp, 1)})

    def forward(self, x):
        relu = torch.relu
        b1 = relu(self.branch1["1x1"](x))
        b2 = relu(self.branch2["3x3"](relu(self.branch2["3x3_reduce"](x))))
        b3 = relu(self.branch3["5x5"](relu(self.branch3["5x5_reduce"](x))))
        b4 = relu(self.branch4["pool_proj"](nn.functional.max_pool2d(x, 3, 1, 1, ceil_mode=True)))
        return torch.cat([b1, b2, b3, b4], 1)


class BVLCGoogLeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1_7x7_s2 = nn.Conv2d(3, 64, 7, 2, 3)
        self.conv2_3x3_reduce = nn.Conv2d(64, 64, 1)
        self.conv2_3x3 = nn.Conv2d(64, 192, 3, padding=1)
        self.lrn = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
        for key, widths in WIDTHS.items():
            setattr(self, f"inception_{key}", CaffeInception(*widths))
        self.loss3_classifier = nn.Linear(1024, 1000)

    def forward(self, x):
        pool = lambda t: nn.functional.max_pool2d(t, 3, 2, ceil_mode=True)  # noqa: E731
        x = self.lrn(pool(torch.relu(self.conv1_7x7_s2(x))))
        x = pool(self.lrn(torch.relu(self.conv2_3x3(torch.relu(self.conv2_3x3_reduce(x))))))
        x = pool(self.inception_3b(self.inception_3a(x)))
        for key in ("4a", "4b", "4c", "4d", "4e"):
            x = getattr(self, f"inception_{key}")(x)
        x = self.inception_5b(self.inception_5a(pool(x)))
        return self.loss3_classifier(torch.flatten(nn.functional.avg_pool2d(x, 7, 1), 1))


VGG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
REFERENCES = {"vgg16": lambda: vgg_torch(VGG_D), "vgg19": lambda: vgg_torch(VGG_E), "alexnet": AlexNet,
              "squeezenet1_1": SqueezeNet11, "googlenet": GoogLeNet, "bvlc_googlenet": BVLCGoogLeNet}


def randomise_batch_norm(module, generator):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 2.0, generator=generator)
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.1, generator=generator)


def check(arch, folder):
    from rabbitkit import pretrained

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    reference = REFERENCES[arch]().eval()
    randomise_batch_norm(reference, generator)
    path = folder / f"{arch}.pth"
    torch.save(reference.state_dict(), path)  # the zip format (PyTorch >= 1.6)
    x = torch.randn(1, 3, 224, 224, generator=generator)
    with torch.no_grad():
        start = time.perf_counter()
        expected = reference(x).numpy()
        torch_s = time.perf_counter() - start
    start = time.perf_counter()
    model = pretrained.load(path, arch=arch)
    load_s = time.perf_counter() - start
    model.forward(x.numpy(), training=False)  # compile the kernels for these shapes
    start = time.perf_counter()
    got = model.forward(x.numpy(), training=False)
    forward_s = time.perf_counter() - start
    rel = float(np.abs(got - expected).max() / np.abs(expected).max())
    same_top5 = list(np.argsort(-got[0])[:5]) == list(np.argsort(-expected[0])[:5])
    size_mb = path.stat().st_size / 1e6
    path.unlink()
    return arch, size_mb, load_s, rel, same_top5, forward_s, torch_s


def rss_kb(field):
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def load_only(mode, path):
    """Run in a fresh process: report seconds and peak memory (MB) above the post-import RSS."""
    from rabbitkit import pretrained
    from rabbitkit.weights import read_weights

    base = rss_kb("VmRSS")
    start = time.perf_counter()
    if mode == "read":
        weights = read_weights(path)
        held = sum(a.nbytes for a in weights.tensors.values())
    else:
        model = pretrained.load(path, arch="vgg16")
        held = model.num_parameters() * 4
    seconds = time.perf_counter() - start
    peak = rss_kb("VmHWM")
    print(f"{seconds:.3f} {(peak - base) / 1024:.1f} {held / 1e6:.1f}")


def load_timing(folder):
    path = folder / "vgg16.pth"
    torch.manual_seed(0)
    torch.save(vgg_torch(VGG_D).state_dict(), path)
    size = path.stat().st_size
    start = time.perf_counter()
    with open(path, "rb") as handle:
        while handle.read(1 << 24):
            pass
    disk_s = time.perf_counter() - start
    print(f"\nVGG-16 .pth: {size / 1e6:.1f} MB; reading its bytes (page cache warm): {disk_s:.3f} s")
    print(f"{'step':<34} {'seconds':>8} {'x read':>7} {'peak MB above imports':>22} {'x size':>7}")
    for mode, label in (("read", "read_weights (tensors only)"), ("load", "pretrained.load (build + copy)")):
        out = subprocess.run([sys.executable, __file__, "--load-only", mode, str(path)], capture_output=True, text=True,
                             check=True, cwd=os.getcwd()).stdout.split()
        seconds, peak, _ = map(float, out)
        print(f"{label:<34} {seconds:>8.3f} {seconds / disk_s:>7.2f} {peak:>22.1f} {peak * 1e6 / size:>7.2f}")
    path.unlink()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", help=f"any of {', '.join(REFERENCES)} (default: all)")
    parser.add_argument("--load-timing", action="store_true")
    parser.add_argument("--load-only", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [a for a in args.archs if a not in REFERENCES]
    if unknown:
        parser.error(f"unknown architecture {unknown[0]}; known: {', '.join(REFERENCES)}")
    if args.load_only:
        load_only(*args.load_only)
        return
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        archs = args.archs or ([] if args.load_timing else list(REFERENCES))
        if archs:
            print(f"{'arch':<15} {'.pth MB':>8} {'load s':>7} {'rel. diff':>10} {'top-5 same':>10} "
                  f"{'rabbitkit fwd s':>15} {'torch fwd s':>11}")
            for arch in archs:
                name, size, load_s, rel, same, fwd, tfwd = check(arch, folder)
                print(f"{name:<15} {size:>8.1f} {load_s:>7.2f} {rel:>10.2e} {str(same):>10} {fwd:>15.3f} {tfwd:>11.3f}",
                      flush=True)
        if args.load_timing:
            load_timing(folder)


if __name__ == "__main__":
    main()
