"""Recurrent layers: LSTM/GRU/RNN (all layers, both directions) and their cells."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import wn_transform as wn
from tests.fixtures.weight_norm import legacy_weight_norm


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


class Packed(nn.Module):
    """An encoder over padded sequences of different lengths (Tacotron 2, ESPnet): the recurrent
    layer runs on a ``PackedSequence``, which holds only the real time steps."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(5, 6)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](6, 8, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.proj(x), lengths, batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])[0]


_LENGTHS = torch.tensor([7, 3, 5, 2, 7, 6, 1, 4, 7, 2, 5, 6, 3, 7, 4, 5])


@pytest.mark.parametrize("kind", KINDS)
def test_data_init_calibrates_packed_sequences_on_their_real_time_steps(kind: str) -> None:
    model, x = Packed(kind), _batch()
    x[torch.arange(7) >= _LENGTHS[:, None]] = 1e3  # padding: must not reach the statistics
    out = wn.apply_weight_norm(model, (x, _LENGTHS))
    report = wn.weight_norm_report(out)
    assert report.notes.unreached == []
    recurrent = {t.qualname: t for t in report.converted if t.module == "rnn"}
    assert set(recurrent) == {f"rnn.weight_{w}_l{layer}{s}" for w in ("ih", "hh") for layer in (0, 1) for s in ("", "_reverse")}
    assert {t.found_by for t in recurrent.values()} == {report.found_by}  # seen running, not added by type
    plain = wn.fold_weight_norm(out)
    first = type(plain.rnn)(6, 8, num_layers=1, bidirectional=True, batch_first=True)
    first.load_state_dict({k: v for k, v in plain.rnn.state_dict().items() if "_l0" in k})
    with torch.no_grad():
        packed = pack_padded_sequence(plain.proj(x), _LENGTHS, batch_first=True, enforce_sorted=False)
        for layer, inputs in {"l0": packed.data, "l1": first(packed)[0].data}.items():
            for suffix in ("", "_reverse"):
                t = F.linear(inputs, getattr(plain.rnn, f"weight_ih_{layer}{suffix}"), getattr(plain.rnn, f"bias_ih_{layer}{suffix}"))
                mean, std = _stats(t)
                torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-4, rtol=0)
                torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)
        torch.testing.assert_close(plain(x, _LENGTHS), out(x, _LENGTHS))


class CellLoop(nn.Module):
    """A decoder loop with a data-dependent branch: neither tracer handles it, so the weights are
    found by recording the ops the batch runs."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[kind](5, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], 8)
        state = (h, h) if isinstance(self.cell, nn.LSTMCell) else h
        for step in x.unbind(1):
            if step.abs().sum() > 0:  # data-dependent control flow
                state = self.cell(step, state)
        return self.head(state[0] if isinstance(state, tuple) else state)


@pytest.mark.parametrize("kind", KINDS)
def test_recorded_cells_are_found_and_their_input_projection_calibrated(kind: str) -> None:
    model, x = CellLoop(kind), _batch()
    out = wn.apply_weight_norm(model, x)
    report = wn.weight_norm_report(out)
    assert report.found_by == "recorded"
    assert {t.qualname: t.found_by for t in report.converted} == dict.fromkeys(["cell.weight_ih", "cell.weight_hh", "head.weight"], "recorded")
    assert report.notes.recurrent_kept == ["cell.weight_hh"]
    plain = wn.fold_weight_norm(out)
    with torch.no_grad():  # calibrated on the cell's first call: the first time step
        t = F.linear(x[:, 0], plain.cell.weight_ih, plain.cell.bias_ih)
    mean, std = _stats(t)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones_like(std), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_the_whole_model_pickles_and_keeps_training_after_loading(kind: str) -> None:
    x = _batch()
    out = wn.apply_weight_norm(Recurrent(kind), x)
    buffer = io.BytesIO()
    torch.save(out, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.rnn).__mro__[1] is type(out.rnn).__mro__[1]  # the same parametrized base class
    torch.testing.assert_close(loaded(x), out(x), rtol=0, atol=0)
    for model in (out, loaded):  # one identical step each: the loaded RNN must read its new weights
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model(x).pow(2).mean().backward()
        optimizer.step()
    torch.testing.assert_close(loaded(x), out(x))
    assert not torch.allclose(loaded(x), wn.apply_weight_norm(Recurrent(kind), x)(x))  # the step changed it


@pytest.mark.parametrize("kind", KINDS)
def test_copies_and_saves_in_mid_training_follow_the_weights_not_the_last_forward(kind: str) -> None:
    """After a training forward an RNN holds the weights that forward computed (tensors with a
    graph, which deepcopy and pickling refuse): ``copy.deepcopy``, an EMA's ``AveragedModel`` and
    ``torch.save`` of the whole model still work, and each copy computes with the current weights."""
    from torch.optim.swa_utils import AveragedModel

    x = _batch()
    model = wn.apply_weight_norm(Recurrent(kind), x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).pow(2).mean().backward()
    optimizer.step()  # the RNN still holds the weights of the forward before this step
    assert any(w.grad_fn is not None for w in model.rnn._flat_weights)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), AveragedModel(model).module, torch.load(buffer, weights_only=False)]
    expected = model(x)
    for other in copies:
        torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


def test_a_packed_sequence_given_as_the_batch_is_one_input() -> None:
    """``PackedSequence`` is a namedtuple, yet a recurrent model takes it whole: the batch is
    ``model(packed)``, not its four fields as arguments; the init standardizes the input
    projections over the real time steps alone."""
    torch.manual_seed(0)
    x = _batch()
    x[torch.arange(7) >= _LENGTHS[:, None]] = 1e3  # padding: not in the packed data
    packed = pack_padded_sequence(x, _LENGTHS, batch_first=True, enforce_sorted=False)
    out = wn.apply_weight_norm(nn.GRU(5, 6, batch_first=True), packed)
    with torch.no_grad():
        w_ih = out.weight_ih_l0
        t = packed.data @ w_ih.t() + out.bias_ih_l0
    torch.testing.assert_close(t.std(0, correction=0), torch.ones(18), atol=1e-4, rtol=0)
    torch.testing.assert_close(t.mean(0), torch.zeros(18), atol=1e-4, rtol=0)


class _TeacherForced(nn.Module):
    """Tacotron's decoder: a zeros go frame through a prenet into the cell, then the targets."""

    def __init__(self, cell: type) -> None:
        super().__init__()
        self.prenet, self.cell = nn.Linear(4, 6), cell(6, 8)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        frame, state, outputs = torch.zeros(y.shape[0], 4), None, []
        for t in range(y.shape[1]):
            state = self.cell(torch.relu(self.prenet(frame)), state)
            outputs.append(state[0] if isinstance(state, tuple) else state)
            frame = y[:, t]
        return torch.stack(outputs, 1)


class _WarmedUp(nn.Module):
    """A GRU run first on a zeros step, then on the data from the state it left."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 8, batch_first=True)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        _, h = self.rnn(torch.zeros(y.shape[0], 1, 4))
        return self.rnn(y, h)[0]


@pytest.mark.parametrize("make", [lambda: _TeacherForced(nn.LSTMCell), lambda: _TeacherForced(nn.GRUCell), _WarmedUp],
                         ids=["lstm-cell", "gru-cell", "gru-warm-up"])
def test_a_recurrent_call_on_a_zeros_frame_is_passed_over_for_the_data(make) -> None:
    """The go frame (zeros, through a prenet and a ReLU) says nothing of the batch: the input
    projection is standardized on the first step of data, not reported constant on the zeros."""
    torch.manual_seed(0)
    y = torch.randn(16, 6, 4) * 2 + 1
    model = wn.apply_weight_norm(make(), y)
    notes = wn.weight_norm_report(model).notes
    assert notes.constant_units == {}
    if isinstance(model, _WarmedUp):
        w_ih, b_ih, data = model.rnn.weight_ih_l0, model.rnn.bias_ih_l0, y.reshape(-1, 4)
    else:
        w_ih, b_ih = model.cell.weight_ih, model.cell.bias_ih
        data = torch.relu(model.prenet(y[:, :-1].reshape(-1, 4)))  # the steps after the go frame
    projection = (data @ w_ih.t() + b_ih).detach()
    if not isinstance(model, _WarmedUp):
        projection = projection.reshape(16, 5, -1)[:, 0]  # the first step on data calibrates it
    torch.testing.assert_close(projection.std(0, correction=0), torch.ones(projection.shape[-1]), atol=1e-4, rtol=0)


class _LegacyRecurrent(nn.Module):
    """An LSTM whose hidden-to-hidden weight carries torch's legacy weight norm hook."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(5, 8, batch_first=True)
        legacy_weight_norm(self.rnn, name="weight_hh_l0")  # computes rnn.weight_hh_l0 (and _flat_weights[1]) once
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0])


def test_a_folded_legacy_recurrent_layer_scripts_with_its_folded_weights() -> None:
    """Build, load a trained checkpoint, fold, script: TorchScript reads the RNN's cached list of
    weights, which must be the folded Parameters, not the ones the hook computed before the load."""
    torch.manual_seed(0)
    trained = _LegacyRecurrent()
    with torch.no_grad():
        trained.rnn.weight_hh_l0_g.mul_(3.0)
    model = _LegacyRecurrent()
    model.load_state_dict(trained.state_dict())
    x = torch.randn(2, 4, 5)
    folded = wn.fold_weight_norm(model)
    assert folded.rnn._flat_weights[1] is folded.rnn.weight_hh_l0
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(folded)(x), trained(x))


@pytest.mark.parametrize("layout", ["legacy", "parametrizations"])
@pytest.mark.parametrize(("make", "names"), [
    (lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True), ("weight_hh_l0", "weight_ih_l1_reverse")),
    (lambda: nn.LSTMCell(3, 4), ("weight_hh",)),
], ids=["lstm", "lstm-cell"])
def test_folding_torchs_weight_norm_on_an_lstm_keeps_its_parameter_order(layout: str, make, names) -> None:
    """An optimizer's state is indexed by parameter position: the folded LSTM (or cell) lists its
    parameters as a plain one does, not the folded weights first."""
    torch.manual_seed(0)
    lstm = make()
    plain_order = [name for name, _ in lstm.named_parameters()]
    for name in names:
        if layout == "legacy":
            legacy_weight_norm(lstm, name=name)
        else:
            torch.nn.utils.parametrizations.weight_norm(lstm, name)
    folded = wn.fold_weight_norm(lstm)
    assert [name for name, _ in folded.named_parameters()] == plain_order
