"""Recurrent layers: LSTM/GRU/RNN (all layers, both directions) and their cells."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wn_transform as wn


class Recurrent(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        self.rnn = rnn(5, 8, num_layers=2, bidirectional=True, batch_first=True)
        cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[kind]
        self.cell = cell(16, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(x)
        state = self.cell(h[:, -1])
        return self.head(state[0] if isinstance(state, tuple) else state)


KINDS = ["lstm", "gru", "rnn"]


def _batch() -> torch.Tensor:
    return torch.randn(16, 7, 5, generator=torch.Generator().manual_seed(1)) * 3 + 1


def _stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = t.reshape(-1, t.shape[-1]).double()
    return rows.mean(0), rows.std(0, unbiased=False)


@pytest.mark.parametrize("kind", KINDS)
def test_every_gate_weight_is_found_per_row(kind: str) -> None:
    report = wn.plan_weight_norm(Recurrent(kind))
    names = {t.qualname: t for t in report.converted}
    expected = {f"rnn.weight_{w}_l{layer}{suffix}" for w in ("ih", "hh") for layer in (0, 1) for suffix in ("", "_reverse")}
    expected |= {"cell.weight_ih", "cell.weight_hh", "head.weight"}
    assert set(names) == expected
    assert all(t.layout.dim == 0 for t in names.values())


@pytest.mark.parametrize("kind", KINDS)
def test_preserve_train_and_fold(kind: str) -> None:
    model, x = Recurrent(kind), _batch()
    out = wn.apply_weight_norm(model, init="preserve")
    torch.testing.assert_close(out(x), model(x))
    optimizer = torch.optim.SGD(out.parameters(), lr=0.1)
    losses = []
    for _ in range(5):  # the flattened-weights cache must follow the new weights every step
        optimizer.zero_grad()
        loss = out(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert out.rnn.parametrizations.weight_hh_l1_reverse.original1.grad is not None
    folded = wn.fold_weight_norm(out)
    torch.testing.assert_close(folded(x), out(x))
    assert type(folded.rnn) is type(model.rnn) and type(folded.cell) is type(model.cell)
    assert [n for n, _ in folded.rnn.named_parameters()] == [n for n, _ in model.rnn.named_parameters()]
    folded(x).sum().backward()  # the plain module trains
    assert folded.rnn.weight_ih_l0.grad is not None


@pytest.mark.parametrize("kind", KINDS)
def test_data_init_standardizes_the_input_projections_layer_by_layer(kind: str) -> None:
    model, x = Recurrent(kind), _batch()
    out = wn.apply_weight_norm(model, x)
    notes = wn.weight_norm_report(out).notes
    assert set(notes.recurrent_kept) == {f"rnn.weight_hh_l{layer}{s}" for layer in (0, 1) for s in ("", "_reverse")} | {"cell.weight_hh"}
    assert notes.unreached == []
    plain = wn.fold_weight_norm(out)
    first = type(plain.rnn)(5, 8, num_layers=1, bidirectional=True, batch_first=True)
    first.load_state_dict({k: v for k, v in plain.rnn.state_dict().items() if "_l0" in k})
    with torch.no_grad():
        layer_inputs = {"l0": x, "l1": first(x)[0]}
        for layer, inputs in layer_inputs.items():
            for suffix in ("", "_reverse"):
                t = F.linear(inputs, getattr(plain.rnn, f"weight_ih_{layer}{suffix}"), getattr(plain.rnn, f"bias_ih_{layer}{suffix}"))
                mean, std = _stats(t)
                torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
                torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)
        t = F.linear(plain.rnn(x)[0][:, -1], plain.cell.weight_ih, plain.cell.bias_ih)
        mean, std = _stats(t)
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)
    for suffix in ("", "_reverse"):  # hidden-to-hidden weights keep their values
        torch.testing.assert_close(plain.rnn.get_parameter(f"weight_hh_l1{suffix}"), model.rnn.get_parameter(f"weight_hh_l1{suffix}"))


def test_the_folded_lstm_exports_and_matches_onnxruntime(tmp_path) -> None:
    x = _batch()
    out = wn.apply_weight_norm(Recurrent("lstm"), x)
    report = wn.export_onnx(out, x, tmp_path / "lstm.onnx")
    assert report.node_counts.get("LSTM") == 2
    assert max(report.max_abs_diff.values()) < 1e-4
