"""End-to-end demo of wn_transform on real data: scikit-learn's 8x8 digits.

What it shows, top to bottom:

1. Load the digits that ship with scikit-learn (1,797 images, 10 classes; no download),
   split them deterministically (the last 297 images are the test set) and standardize
   them with training statistics.
2. Build one small, seeded CNN and make two copies of it: a plain one, and one passed
   through ``wn_transform.apply_weight_norm`` with the paper's data-dependent init on a
   calibration batch of 256 training images.  The report table says what was converted.
3. Train both side by side (same initial weights, same lr, same data order) and print a
   per-epoch table of train loss and test accuracy.
4. Fold the trained weight-normalized model back into plain weights with
   ``wn_transform.fold_weight_norm`` and check that it computes the same function, has
   plain ``weight`` parameters and keeps the original class.  Exits non-zero otherwise.

Run with ``make demo`` (or ``.venv/bin/python examples/demo.py``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

import wn_transform

SEED = 0
N_TEST = 297
CALIB_SIZE = 256
EPOCHS = 8
BATCH_SIZE = 64
LR = 0.01  # one lr for both; at 0.03+ the weight-normalized model starts unstably
MOMENTUM = 0.9
FOLD_TOLERANCE = 1e-5
SHOWN_LAYER = "0"  # the first conv, whose state-dict keys are printed before/after folding


@dataclass(frozen=True)
class Data:
    """Standardized digits as ``(N, 1, 8, 8)`` float tensors and integer labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass(frozen=True)
class EpochResult:
    """One epoch of one model: mean training loss and test accuracy after the epoch."""

    train_loss: float
    test_accuracy: float


def load_data() -> Data:
    """The digits, last ``N_TEST`` images held out, pixels in [0, 1], standardized on train."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test = images[:-N_TEST], images[-N_TEST:]
    mean, std = x_train.mean(), x_train.std()
    return Data((x_train - mean) / std, labels[:-N_TEST], (x_test - mean) / std, labels[-N_TEST:])


def build_cnn() -> nn.Sequential:
    """A small CNN for 8x8 images, seeded so every run starts from the same weights."""
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: Data, generator: torch.Generator) -> float:
    """One pass over the shuffled training set; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(data.x_train), generator=generator)
    total, count = 0.0, 0
    for start in range(0, len(order), BATCH_SIZE):
        idx = order[start:start + BATCH_SIZE]
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        count += len(idx)
    return total / count


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """The model's logits on ``x`` in eval mode."""
    model.eval()
    return model(x)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Fraction of ``x`` classified as ``y``."""
    return (predict(model, x).argmax(dim=1) == y).float().mean().item()


def train_side_by_side(models: dict[str, nn.Module], data: Data) -> dict[str, list[EpochResult]]:
    """Train every model with the same optimizer settings and the same data order."""
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=LR, momentum=MOMENTUM) for name, m in models.items()}
    generators = {name: torch.Generator().manual_seed(SEED) for name in models}
    history: dict[str, list[EpochResult]] = {name: [] for name in models}
    for _ in range(EPOCHS):
        for name, model in models.items():
            loss = train_epoch(model, optimizers[name], data, generators[name])
            history[name].append(EpochResult(loss, accuracy(model, data.x_test, data.y_test)))
    return history


def format_history(history: dict[str, list[EpochResult]]) -> str:
    """A per-epoch table: train loss and test accuracy of every model."""
    names = list(history)
    header = f"{'epoch':>5}  " + "  ".join(f"{name + ' loss':>16}  {name + ' acc':>15}" for name in names)
    lines = [header, "-" * len(header)]
    for epoch in range(EPOCHS):
        cells = "  ".join(f"{history[n][epoch].train_loss:>16.4f}  {history[n][epoch].test_accuracy:>15.2%}" for n in names)
        lines.append(f"{epoch + 1:>5}  {cells}")
    return "\n".join(lines)


def layer_keys(model: nn.Module, layer: str) -> list[str]:
    """The state-dict keys of one submodule, relative to it."""
    return list(model.get_submodule(layer).state_dict().keys())


def fold_output_difference(wn_model: nn.Module, folded: nn.Module, x: Tensor) -> float:
    """Max absolute difference between the folded and the unfolded model's logits, in eval mode."""
    return (predict(folded, x) - predict(wn_model, x)).abs().max().item()


def fold_structure_problems(folded: nn.Module, original: nn.Module) -> list[str]:
    """What makes ``folded`` differ in structure from ``original`` (empty: nothing)."""
    problems = []
    leftover = [key for key in folded.state_dict() if "parametrizations" in key]
    if leftover:
        problems.append(f"state dict still holds parametrizations: {leftover}")
    for name, module in original.named_modules():
        twin = folded.get_submodule(name)
        if type(twin) is not type(module):
            problems.append(f"module {name or '<root>'} is {type(twin).__name__}, expected {type(module).__name__}")
        if "weight" in module._parameters and type(twin._parameters.get("weight")) is not nn.Parameter:
            problems.append(f"module {name} has no plain 'weight' Parameter")
    return problems


def fold_and_check(wn_model: nn.Module, original: nn.Module, x_test: Tensor) -> list[str]:
    """Fold ``wn_model``, print what changed, and return the failed checks (empty: all passed)."""
    before = layer_keys(wn_model, SHOWN_LAYER)
    folded = wn_transform.fold_weight_norm(wn_model)
    print(f"layer {SHOWN_LAYER} ({type(folded.get_submodule(SHOWN_LAYER)).__name__}) state-dict keys")
    print(f"  before folding: {before}")
    print(f"  after folding:  {layer_keys(folded, SHOWN_LAYER)}")
    failures = []
    diff = fold_output_difference(wn_model, folded, x_test)
    print(f"max |folded - unfolded| logits on the {len(x_test)} test images: {diff:.3e} (tolerance {FOLD_TOLERANCE:.0e})")
    if not diff <= FOLD_TOLERANCE:  # also catches NaN
        failures.append(f"folded outputs differ from the weight-normalized model's by {diff:.3e} > {FOLD_TOLERANCE:.0e}")
    problems = fold_structure_problems(folded, original)
    print(f"plain 'weight' Parameters, no 'parametrizations' keys, same classes as the original: {'no' if problems else 'yes'}")
    return failures + problems


def main() -> int:
    """Run the demo; returns the process exit status."""
    started = time.perf_counter()
    torch.set_num_threads(2)
    data = load_data()
    print(f"digits: {len(data.x_train)} train, {len(data.x_test)} test images of 8x8, 10 classes\n")

    plain = build_cnn()
    calib_batch = data.x_train[:CALIB_SIZE]
    wn_model = wn_transform.apply_weight_norm(plain, calib_batch)  # a copy; ``plain`` is untouched
    print(f"apply_weight_norm with data-dependent init on {CALIB_SIZE} training images:")
    print(wn_transform.weight_norm_report(wn_model))

    print(f"\ntraining {EPOCHS} epochs, batch {BATCH_SIZE}, SGD lr={LR} momentum={MOMENTUM}, same data order:")
    history = train_side_by_side({"plain": plain, "wn": wn_model}, data)
    print(format_history(history))

    print("\nfolding the trained weight-normalized model back into plain weights:")
    failures = fold_and_check(wn_model, plain, data.x_test)

    print(f"\ntotal time: {time.perf_counter() - started:.1f} s")
    if failures:
        print("FOLD CHECK FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("fold check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
