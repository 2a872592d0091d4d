"""PyTorch reference for `cnnc bench`: the training step of the issue's two networks.

The same architectures as `examples/models/lenet5.cnn` and `examples/models/cifar_inception.cnn`
(the CIFAR net: a conv-bn-relu stem, two inception modules with factored 1x3 / 3x1 branches, a
bottleneck residual block between them, global pooling and a linear head), trained a step at a
time on random data: forward, cross-entropy and backward to the parameter gradients, what
`cnnc bench` times as a training step (`--optimizer` adds SGD with momentum). Prints the
median step time of repeated runs (and of inference, in eval mode without gradients),
for the default (NCHW) and channels-last memory formats.

Not part of the test suite: PyTorch is not a dependency of cnnc. Run it beside `cnnc bench`
in the same minutes (this machine is noisy), e.g.

    python3 benches/pytorch/train_step.py --threads 2 --reps 20

"""

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def cbr(cin, cout, k, pad):
    """conv (no bias) -> batch norm -> relu, the `cbr` block of cifar_inception.cnn."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class InceptionF(nn.Module):
    """`inception_f(b1, b2r, b2, b3r, b3, pp)`: four branches concatenated by channel."""

    def __init__(self, cin, b1, b2r, b2, b3r, b3, pp):
        super().__init__()
        self.b1 = cbr(cin, b1, 1, 0)
        self.b2 = nn.Sequential(cbr(cin, b2r, 1, 0), cbr(b2r, b2, (1, 3), (0, 1)), cbr(b2, b2, (3, 1), (1, 0)))
        self.b3 = nn.Sequential(cbr(cin, b3r, 1, 0), cbr(b3r, b3, (1, 3), (0, 1)), cbr(b3, b3, (3, 1), (1, 0)))
        self.pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), cbr(cin, pp, 1, 0))
        self.channels = b1 + b2 + b3 + pp

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.pool(x)], dim=1)


class BottleneckRes(nn.Module):
    """`bottleneck_res(c, w)`: 1x1 reduce, 3x3, 1x1 expand + batch norm, added to the input, relu."""

    def __init__(self, c, w):
        super().__init__()
        self.body = nn.Sequential(cbr(w, c, 1, 0), cbr(c, c, 3, 1), nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w))

    def forward(self, x):
        return F.relu(self.body(x) + x)


class CifarInception(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = cbr(3, 64, 3, 1)
        self.inc1 = InceptionF(64, 32, 48, 64, 16, 16, 16)
        self.pool1 = nn.MaxPool2d(2, stride=2)
        self.res = BottleneckRes(40, self.inc1.channels)
        self.inc2 = InceptionF(self.inc1.channels, 64, 96, 128, 32, 48, 48)
        self.fc = nn.Linear(self.inc2.channels, classes)

    def forward(self, x):
        x = self.inc2(self.res(self.pool1(self.inc1(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class LeNet5(nn.Module):
    """`lenet5.cnn`: conv 6@5x5, relu, max pool 2x2, conv 16@5x5, relu, max pool, 120, 84, 10."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 5)
        self.c2 = nn.Conv2d(6, 16, 5)
        self.f1 = nn.Linear(16 * 4 * 4, 120)
        self.f2 = nn.Linear(120, 84)
        self.f3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)
        x = F.max_pool2d(F.relu(self.c2(x)), 2)
        x = torch.flatten(x, 1)
        return self.f3(F.relu(self.f2(F.relu(self.f1(x)))))


def step_times(model, shape, batch, reps, channels_last, optimizer):
    torch.manual_seed(0)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if optimizer:
            opt.step()

    def infer():
        with torch.no_grad():
            model(x)

    result = []
    for mode, f in (("train", step), ("eval", infer)):
        model.train(mode == "train")
        for _ in range(3):
            f()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            times.append((time.perf_counter() - t0) * 1e3)
        result.append(times)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--model", choices=["cifar", "lenet", "both"], default="both")
    p.add_argument("--optimizer", action="store_true", help="add SGD's update to the step (cnnc bench's step has none)")
    p.add_argument("--layout", choices=["nchw", "channels-last", "both"], default="both", help="memory formats to time")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cases = []
    if a.model in ("lenet", "both"):
        cases.append(("LeNet-5", LeNet5, (1, 28, 28), 64))
    if a.model in ("cifar", "both"):
        cases.append(("CIFAR inception", CifarInception, (3, 32, 32), 32))
    print(f"PyTorch {torch.__version__}, {a.threads} threads, medians of {a.reps} steps")
    for name, cls, shape, batch in cases:
        for cl in {"nchw": (False,), "channels-last": (True,), "both": (False, True)}[a.layout]:
            t, i = step_times(cls(), shape, batch, a.reps, cl, a.optimizer)
            fmt = "channels-last" if cl else "NCHW"
            print(
                f"{name:16s} batch {batch:3d} {fmt:13s} training step {statistics.median(t):8.2f} ms (min {min(t):.2f}, max {max(t):.2f}),"
                f" inference {statistics.median(i):7.2f} ms"
            )


if __name__ == "__main__":
    main()
