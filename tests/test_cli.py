"""The wn-transform CLI (in process, and as a subprocess the way users run it), and the checkpoint safety rules."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickle
import re
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import wn_transform as wn
from tests.fixtures.hifigan import build_generator, build_partly_normalized, build_plain
from wn_transform import checkpoint
from wn_transform.cli import main

MODEL = "tests.fixtures.hifigan:build_plain"


def cli(*args: str) -> subprocess.CompletedProcess:
    """``wn-transform ARGS`` in this process (a subprocess per call cost ~5 s of imports): its exit
    status, standard output and standard error, as ``subprocess.run`` would give them.  The entry
    point itself runs as a subprocess in ``test_a_malicious_pickle_is_refused_not_executed`` and
    ``tests/test_api.py``; an uncaught exception (a traceback) fails the calling test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors and --help
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return subprocess.CompletedProcess(["wn-transform", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def nested(tmp_path: Path) -> Path:
    """A vocoder training checkpoint: generator with weight norm, a discriminator, a step count."""
    path = tmp_path / "ckpt.pt"
    torch.save({"generator": build_generator("parametrizations").state_dict(),
                "discriminator": build_generator("legacy", seed=3).state_dict(), "step": 1000}, path)
    return path


@pytest.mark.parametrize("command", ["inspect", "fold", "convert", "apply", "export"])
def test_every_command_has_help_with_a_worked_example(command: str) -> None:
    result = cli(command, "--help")
    assert result.returncode == 0
    assert f"wn-transform {command}" in result.stdout and "example" in result.stdout


def test_inspect_lists_layouts_axes_and_totals(nested: Path) -> None:
    result = cli("inspect", str(nested))
    assert result.returncode == 0, result.stderr
    assert "generator: 8 weight-normalized tensors" in result.stdout
    assert "discriminator: 8 weight-normalized tensors" in result.stdout
    assert "whole tensor" in result.stdout and "legacy" in result.stdout


def test_inspect_with_a_model_shows_the_plan() -> None:
    result = cli("inspect", "--model", MODEL)
    assert result.returncode == 0, result.stderr
    assert "conv_pre.weight" in result.stdout and "conv_transpose" in result.stdout and "init=preserve" in result.stdout


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_fold_keeps_the_nesting_and_equals_folding_the_model(nested: Path, tmp_path: Path, suffix: str) -> None:
    source = nested
    if suffix == ".safetensors":  # safetensors holds one flat state dict
        source = tmp_path / "g.safetensors"
        save_file(build_generator("parametrizations").state_dict(), source)
    out = tmp_path / f"plain{suffix}"
    before = source.read_bytes()
    result = cli("fold", str(source), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert source.read_bytes() == before  # the input is never modified
    folded = load_file(out) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    generator = folded if suffix == ".safetensors" else folded["generator"]
    if suffix == ".pt":
        assert folded["step"] == 1000 and set(folded) == {"generator", "discriminator", "step"}
    expected = wn.fold_weight_norm(build_generator("parametrizations")).state_dict()
    assert generator.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(generator[key], expected[key])


@pytest.mark.parametrize("command", ["fold", "convert"])
def test_key_writes_one_nested_state_dict_alone_which_safetensors_can_hold(command: str, nested: Path, tmp_path: Path,
                                                                          capsys) -> None:
    out = tmp_path / "generator.safetensors"
    layout = ["--to", "legacy"] if command == "convert" else []
    assert main([command, str(nested), "-o", str(out), *layout]) == 1  # a nested checkpoint: one state dict needed
    assert "(fold and convert take --key)" in capsys.readouterr().err and not out.exists()
    assert main([command, str(nested), "--key", "generator", "-o", str(out), *layout]) == 0
    model = build_plain() if command == "fold" else build_generator("legacy")
    model.load_state_dict(load_file(out))
    reference = wn.fold_weight_norm(build_generator("parametrizations"))
    mel = torch.randn(1, 80, 6)
    torch.testing.assert_close(model(mel), reference(mel))
    assert main([command, str(nested), "--key", "nope", "-o", str(tmp_path / "x.pt"), *layout]) == 1
    assert "no state dict under --key nope (found: generator, discriminator)" in capsys.readouterr().err


def test_fold_refuses_to_overwrite_without_force_and_never_writes_over_its_input(nested: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    result = cli("fold", str(nested), "-o", str(out))
    assert result.returncode == 1 and "already exists" in result.stderr and out.read_bytes() == b"keep me"
    assert cli("fold", str(nested), "-o", str(out), "--force").returncode == 0
    result = cli("fold", str(nested), "-o", str(nested), "--force")
    assert result.returncode == 1 and "is the input file" in result.stderr


def test_convert_round_trips_between_torchs_layouts(nested: Path, tmp_path: Path) -> None:
    legacy, back = tmp_path / "legacy.pt", tmp_path / "back.pt"
    assert cli("convert", str(nested), "-o", str(legacy), "--to", "legacy").returncode == 0
    model = build_generator("legacy", seed=5)
    model.load_state_dict(torch.load(legacy, weights_only=True)["generator"])
    assert cli("convert", str(legacy), "-o", str(back), "--to", "parametrizations").returncode == 0
    model = build_generator("parametrizations", seed=5)
    model.load_state_dict(torch.load(back, weights_only=True)["generator"])
    mel = torch.randn(1, 80, 10)
    torch.testing.assert_close(model(mel), build_generator("parametrizations")(mel))


def test_apply_with_calibration_file_and_preserve(tmp_path: Path) -> None:
    calib = tmp_path / "mel.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((4, 80, 16)).astype(np.float32))
    plain_ckpt = tmp_path / "plain.pt"
    torch.save({"module." + k: v for k, v in build_plain(seed=7).state_dict().items()}, plain_ckpt)  # DataParallel
    out = tmp_path / "wn.pt"
    result = cli("apply", "--model", MODEL, "--checkpoint", str(plain_ckpt), "--preserve", "-o", str(out))
    assert result.returncode == 0, result.stderr
    model = wn.apply_weight_norm(build_plain(), init="preserve")
    model.load_state_dict(torch.load(out, weights_only=True))
    mel = torch.randn(2, 80, 9)
    torch.testing.assert_close(model(mel), build_plain(seed=7)(mel))
    out = tmp_path / "wn_init.safetensors"
    result = cli("apply", "--model", MODEL, "--calib", str(calib), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "init=data" in result.stdout and any(k.endswith("original0") for k in load_file(out))
    default = load_file(out)
    for flag in ("--exact-init", "--fast-init"):  # the default hands on g*t + b, as --fast-init asks
        other = tmp_path / f"wn{flag}.safetensors"
        result = cli("apply", "--model", MODEL, "--calib", str(calib), flag, "-o", str(other))
        assert result.returncode == 0, result.stderr
        tensors = load_file(other)
        assert tensors.keys() == default.keys()
        for key in default:  # a shallow model: the exact init sets the fast init's values to rounding
            if flag == "--fast-init":
                torch.testing.assert_close(tensors[key], default[key], rtol=0, atol=0, msg=key)
            else:
                torch.testing.assert_close(tensors[key], default[key], rtol=1e-4, atol=1e-5, msg=key)
    result = cli("apply", "--model", MODEL, "--calib", str(calib), "--exact-init", "--fast-init", "-o", str(out) + "2")
    assert result.returncode == 2 and "not allowed with argument" in result.stderr, result.stderr


def build_data_parallel() -> torch.nn.Module:
    return torch.nn.DataParallel(build_plain())


@pytest.mark.parametrize("factory", ["build_data_parallel", "build_compiled"])
def test_a_factory_that_wraps_its_model_loads_the_plain_models_checkpoint(tmp_path: Path, factory: str) -> None:
    """DataParallel's and torch.compile's keys carry a prefix (``module.``, ``_orig_mod.``) that a
    checkpoint of the model they hold lacks: it is loaded into that model."""
    plain_ckpt = tmp_path / "plain.pt"
    torch.save(build_plain(seed=7).state_dict(), plain_ckpt)
    out = tmp_path / "wn.pt"
    result = cli("apply", "--model", f"tests.test_cli:{factory}", "--checkpoint", str(plain_ckpt), "--preserve",
                 "-o", str(out))
    assert result.returncode == 0, result.stderr
    state = {k.split(".", 1)[1]: v for k, v in torch.load(out, weights_only=True).items()}  # the wrapper's prefix off
    model = wn.apply_weight_norm(build_plain(), init="preserve")
    model.load_state_dict(state)
    mel = torch.randn(2, 80, 9)
    torch.testing.assert_close(model(mel), build_plain(seed=7)(mel))


def build_compiled() -> torch.nn.Module:
    return torch.compile(build_plain())


def test_an_output_in_a_folder_that_does_not_exist_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    calib = tmp_path / "mel.pt"
    torch.save(torch.randn(4, 80, 16), calib)

    def no_work(*args, **kwargs):
        raise AssertionError("the model was weight-normalized before the output was checked")

    monkeypatch.setattr("wn_transform.cli.apply_weight_norm", no_work)
    out = tmp_path / "missing" / "wn.pt"
    result = cli("apply", "--model", MODEL, "--calib", str(calib), "-o", str(out))
    assert result.returncode == 1 and f"{out}: the folder {out.parent} does not exist" in result.stderr


def test_apply_converts_the_weight_norm_a_model_is_built_with_when_asked(tmp_path: Path) -> None:
    """``--existing convert`` (the report's advice for a weight norm the model already has): the pair
    over the kernel axis (``dim=2``) becomes ours, per output unit, computing the same weight; the
    default keeps it as torch's."""
    path = "tests.fixtures.hifigan:build_partly_normalized"
    pairs = {}
    for existing in ("keep", "convert"):
        out = tmp_path / f"{existing}.safetensors"
        result = cli("apply", "--model", path, "--preserve", "--existing", existing, "-o", str(out))
        assert result.returncode == 0, result.stderr
        state = load_file(out)
        pairs[existing] = {p.weight_key: p for p in wn.find_state_dict_weight_norms(state)}
        torch.testing.assert_close(wn.fold_state_dict(state)["conv_pre.weight"],
                                   wn.fold_weight_norm(build_partly_normalized()).conv_pre.weight)
    assert pairs["keep"]["conv_pre.weight"].dim == 2 and pairs["convert"]["conv_pre.weight"].dim == 0
    assert "existing='convert' replaces it" in cli("apply", "--model", path, "--preserve", "-o",
                                                   str(tmp_path / "again.pt")).stdout


def test_inspect_with_a_batch_refuses_what_apply_would_refuse(tmp_path: Path) -> None:
    """The plan runs the batch when the discovery step traced symbolically (it never ran it)."""
    wrong = tmp_path / "wrong.pt"
    torch.save(torch.randn(2, 79, 16), wrong)  # 79 mel bins for a model of 80
    for command in (["inspect", "--model", MODEL, "--sample", str(wrong)],
                    ["apply", "--model", MODEL, "--calib", str(wrong), "-o", str(tmp_path / "o.pt")]):
        result = cli(*command)
        assert result.returncode == 1 and "the model rejected the sample batch in layer 'conv_pre'" in result.stderr, result
    empty = tmp_path / "empty.pt"
    torch.save(torch.randn(0, 80, 16), empty)
    result = cli("inspect", "--model", MODEL, "--sample", str(empty))
    assert result.returncode == 1 and "the sample batch is empty" in result.stderr


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [(["apply", "--model", "no_such_pkg.models:build", "--preserve"], "cannot import 'no_such_pkg.models'", 1),
     (["apply", "--model", "tests.fixtures.hifigan:nope", "--preserve"], "has no attribute 'nope'", 1),
     (["apply", "--model", "tests.fixtures.hifigan:broken_factory", "--preserve"], "this factory always fails", 1),
     (["apply", "--model", MODEL, "--model-kwargs", "{oops", "--preserve"], "not valid JSON", 2),
     (["apply", "--model", "no-colon", "--preserve"], "package.module:factory", 2),
     (["apply", "--model", MODEL], "one of the arguments --calib --preserve is required", 2)],
)
def test_factory_and_usage_errors(tmp_path: Path, args: list[str], message: str, code: int) -> None:
    result = cli(*args, "-o", str(tmp_path / "out.pt"))
    assert result.returncode == code and message in result.stderr, result.stderr
    assert not (tmp_path / "out.pt").exists()


def test_a_calibration_batch_the_model_rejects_names_the_layer(tmp_path: Path) -> None:
    calib = tmp_path / "bad.pt"
    torch.save(torch.randn(2, 40, 16), calib)  # 40 mel bins, the model wants 80
    result = cli("apply", "--model", MODEL, "--calib", str(calib), "-o", str(tmp_path / "out.pt"))
    assert result.returncode == 1 and "layer 'conv_pre' (Conv1d)" in result.stderr
    assert not (tmp_path / "out.pt").exists()


def test_a_checkpoint_that_does_not_fit_names_the_keys(nested: Path, tmp_path: Path) -> None:
    result = cli("apply", "--model", MODEL, "--checkpoint", str(nested), "--preserve", "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 1 and "choose one with --key" in result.stderr
    other = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, other)
    result = cli("apply", "--model", MODEL, "--checkpoint", str(other), "--preserve", "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 1 and "unexpected keys encoder.weight" in result.stderr


def test_a_weight_normalized_checkpoint_short_of_one_key_names_that_key_alone(nested: Path, tmp_path: Path) -> None:
    """Its pairs are folded before the keys are compared: the one key it lacks is what is missing."""
    state = torch.load(nested)["generator"]
    lost = next(k for k in state if k.endswith(".bias"))
    del state[lost]
    short = tmp_path / "short.pt"
    torch.save(state, short)
    result = cli("apply", "--model", MODEL, "--checkpoint", str(short), "--preserve", "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 1
    assert result.stderr.strip().endswith(f"does not fit {MODEL}: missing keys {lost}"), result.stderr


def test_a_lightning_checkpoint_loaded_without_key_is_told_the_prefix_that_fits(tmp_path: Path) -> None:
    lightning = tmp_path / "last.ckpt"
    state = {f"generator.{k}": v for k, v in build_generator("parametrizations").state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1000}, lightning)
    result = cli("apply", "--model", MODEL, "--checkpoint", str(lightning), "--preserve", "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 1 and "choose them with --key generator" in result.stderr, result.stderr
    result = cli("apply", "--model", MODEL, "--checkpoint", str(lightning), "--key", "generator", "--preserve",
                 "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 0, result.stderr
    for command in (["inspect", str(lightning), "--key", "generator"],  # the file's listing takes --key as loading does
                    ["inspect", str(lightning), "--model", MODEL, "--checkpoint", str(lightning), "--key", "generator"]):
        result = cli(*command)
        assert result.returncode == 0 and "generator (the keys under 'generator.'): 8 weight-normalized" in result.stdout, \
            result.stdout + result.stderr


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_malicious_pickle_is_refused_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, path)
    result = subprocess.run([sys.executable, "-m", "wn_transform.cli", "fold", str(path), "-o", str(tmp_path / "o.pt")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "refused to load" in result.stderr and "weights_only=False" in result.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"just some text here\n", pickle.dumps([1, 2, 3])])
def test_files_that_are_not_checkpoints_get_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    result = cli("fold", str(path), "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 1 and str(path) in result.stderr and "Traceback" not in result.stderr
    assert "not a PyTorch checkpoint" in result.stderr
    assert "weights_only=False" not in result.stderr  # no advice to run code that is not there
    assert [line for line in result.stderr.splitlines() if not line.startswith("[")] == [  # progress lines aside
        next(line for line in result.stderr.splitlines() if "error:" in line)]  # one line: no warning


def test_only_a_file_that_needs_code_gets_the_weights_only_advice(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "args.pt"
    torch.save({"state_dict": build_generator().state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(checkpoint.CheckpointError, match=r"needs arbitrary Python code to unpickle \(Unsupported "
                       r"global: GLOBAL argparse.Namespace.*allow it with --safe-global argparse.Namespace .*"
                       r"safe_globals\(\[argparse.Namespace\]\).*weights_only=False"):
        checkpoint.load_checkpoint(path)
    out = tmp_path / "plain.pt"  # the class allowed: folded, its Namespace kept
    assert main(["fold", str(path), "--safe-global", "argparse.Namespace", "-o", str(out)]) == 0
    with torch.serialization.safe_globals([argparse.Namespace]):
        folded = torch.load(out, weights_only=True)
    assert folded["args"] == argparse.Namespace(lr=1) and not wn.find_state_dict_weight_norms(folded["state_dict"])
    with pytest.raises(SystemExit):  # (argparse's usage error, exit code 2)
        main(["fold", str(path), "--safe-global", "argparse.Nope", "-o", str(out)])


def test_following_the_safe_global_hints_loads_a_file_with_numpy_1_scalars(tmp_path: Path, capsys) -> None:
    """A numpy scalar pickled by numpy 1.x names ``numpy.core.multiarray.scalar`` (numpy 2's alias of
    ``numpy._core``'s), then its dtype's class (which torch's error gives as "Can only build ...
    but got <class ...>"): each refusal names the class to allow, under the name the pickle uses,
    and following them loads the file."""
    import zipfile

    state = build_generator().state_dict()
    torch.save({"model": state, "best": np.float64(0.25)}, tmp_path / "numpy2.pt")
    path = tmp_path / "numpy1.pt"
    with zipfile.ZipFile(tmp_path / "numpy2.pt") as source, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(info.filename, data)
    allowed: list[str] = []
    for _ in range(4):
        if main(["fold", str(path), *[a for name in allowed for a in ("--safe-global", name)], "-o",
                 str(tmp_path / "plain.pt"), "--force"]) == 0:
            break
        error = capsys.readouterr().err
        allowed.append(re.search(r"allow it with --safe-global (\S+) \(the CLI\)", error).group(1))
    assert allowed[0] == "numpy.core.multiarray.scalar" and "numpy.dtypes.Float64DType" in allowed
    with torch.serialization.safe_globals([np._core.multiarray.scalar, np.dtype, np.dtypes.Float64DType]):
        assert torch.load(tmp_path / "plain.pt", weights_only=True)["best"] == 0.25


def test_a_safe_global_from_the_current_folder_and_a_nested_class_that_needs_getattr(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "runcfg.py").write_text("class Config:\n    def __init__(self, lr=1):\n        self.lr = lr\n"
                                        "class Outer:\n    class Inner:\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import runcfg

    state = build_generator().state_dict()
    torch.save({"model": state, "cfg": runcfg.Config(lr=3)}, tmp_path / "own.pt")
    torch.save({"model": state, "cfg": runcfg.Outer.Inner()}, tmp_path / "nested.pt", pickle_protocol=2)
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    result = run([sys.executable, "-m", "wn_transform.cli", "fold", "own.pt", "--safe-global", "runcfg.Config", "-o", "o.pt"])
    assert result.returncode == 0, result.stderr
    result = run([sys.executable, "-m", "wn_transform.cli", "fold", "nested.pt", "-o", "n.pt"])
    assert result.returncode == 1 and "GLOBAL getattr" in result.stderr and "--safe-global" not in result.stderr
    assert "If you trust its source, load it with torch.load(..., weights_only=False)" in result.stderr


@pytest.mark.parametrize(("written", "read"), [
    ("model.safetensors", "model.pt"),  # a safetensors file under another name: told by its first bytes
    ("MODEL.SAFETENSORS", "MODEL.SAFETENSORS"),
])
def test_safetensors_is_told_by_content_and_by_any_case_suffix(tmp_path: Path, written: str, read: str) -> None:
    state = build_generator().state_dict()
    checkpoint.save_checkpoint(state, tmp_path / written)
    load_file(tmp_path / written)  # it is safetensors
    if read != written:
        (tmp_path / written).rename(tmp_path / read)
    loaded = checkpoint.load_checkpoint(tmp_path / read)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    assert main(["fold", str(tmp_path / read), "-o", str(tmp_path / "folded.SafeTensors")]) == 0
    torch.testing.assert_close(load_file(tmp_path / "folded.SafeTensors"), wn.fold_state_dict(state))


def test_a_plain_checkpoint_has_nothing_to_fold(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save(build_plain().state_dict(), path)
    result = cli("fold", str(path), "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 1 and "no weight-normalized tensors" in result.stderr


def test_an_output_that_is_a_folder_is_named_as_one(nested: Path, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{re.escape(str(folder))}: is a folder; give the path"):
        checkpoint.save_checkpoint({"w": torch.ones(1)}, folder, force=True)
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "out"]


def test_an_interrupted_write_leaves_no_partial_output(nested: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out.pt"

    def crash(obj, f, *args, **kwargs) -> None:
        Path(f).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", crash)
    assert main(["fold", str(nested), "-o", str(out)]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


@contextlib.contextmanager
def _file_size_limit(nbytes: int) -> Iterator[None]:
    """Writes past ``nbytes`` fail in this process (``EFBIG``, as on a full disk; Python ignores SIGXFSZ)."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_write_that_fails_on_a_full_disk_is_a_one_line_error_and_leaves_nothing(nested: Path, tmp_path: Path,
                                                                                 suffix: str) -> None:
    out = tmp_path / f"out{suffix}"
    with _file_size_limit(4096):
        result = cli("fold", str(nested), "--key", "generator", "-o", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(rf"error: {re.escape(str(out))}: writing it failed \(.+\); no file was written$", result.stderr.strip())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


@pytest.mark.parametrize("exporter", ["auto", "torchscript"])  # the TorchScript exporter writes a file of its own first
def test_an_export_that_fails_on_a_full_disk_names_its_file_and_leaves_nothing(tmp_path: Path, exporter: str) -> None:
    out = tmp_path / "g.onnx"
    with _file_size_limit(4096):
        result = cli("export", "--model", "tests.fixtures.hifigan:build_generator", "--input-shape", "1,80,12",
                     "--exporter", exporter, "-o", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"File too large: '{out}'" in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_termination_signal_during_a_write_leaves_nothing_and_exits_128_plus_its_number(
        signame: str, nested: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """``kill``, ``timeout`` and job schedulers send SIGTERM, a closed terminal SIGHUP: by default
    either ends the process at once, leaving the temporary file behind; the CLI cleans up as for Ctrl-C."""
    import os
    import signal

    signum = getattr(signal, signame)
    out = tmp_path / "out.pt"

    def killed_while_writing(obj, f, *args, **kwargs) -> None:
        Path(f).write_bytes(b"half a file")
        os.kill(os.getpid(), signum)  # the handler runs at the next bytecode, inside this write

    monkeypatch.setattr(checkpoint.torch, "save", killed_while_writing)
    before = signal.getsignal(signum)
    assert main(["fold", str(nested), "-o", str(out)]) == 128 + signum
    assert f"stopped by {signame}; no output was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert signal.getsignal(signum) == before  # the user's handler is back


def test_batch_files_in_every_format(tmp_path: Path) -> None:
    x = torch.randn(2, 3)
    torch.save((x, x + 1), tmp_path / "t.pt")
    np.savez(tmp_path / "d.npz", a=x.numpy(), b=(x + 1).numpy())
    save_file({"only": x}, tmp_path / "one.safetensors")
    assert isinstance(checkpoint.load_batch(tmp_path / "t.pt"), tuple)
    assert set(checkpoint.load_batch(tmp_path / "d.npz")) == {"a", "b"}
    torch.testing.assert_close(checkpoint.load_batch(tmp_path / "one.safetensors"), x)


def test_numpy_batches_keep_shape_and_values_and_bad_ones_are_named(tmp_path: Path) -> None:
    np.save(tmp_path / "scalar.npy", np.float32(0.5))
    with (tmp_path / "big_endian.NPY").open("wb") as file:  # a path not ending in .npy would get one
        np.save(file, np.arange(6, dtype=">f4").reshape(2, 3))
    np.savez(tmp_path / "kw.npz", x=np.ones((1, 3), np.float32), temperature=np.float32(0.5))
    assert checkpoint.load_batch(tmp_path / "scalar.npy").shape == ()
    torch.testing.assert_close(checkpoint.load_batch(tmp_path / "big_endian.NPY"), torch.arange(6.0).reshape(2, 3))
    assert checkpoint.load_batch(tmp_path / "kw.npz")["temperature"].shape == ()
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "folder.npy").mkdir()
    for name, what in [("empty.npy", "not a readable NumPy array file"), ("broken.npz", "not a readable NumPy archive"),
                       ("objects.npy", "not a readable NumPy array file"), ("folder.npy", "not a file")]:
        with pytest.raises(checkpoint.CheckpointError, match=rf"^{re.escape(str(tmp_path / name))}: {what}"):
            checkpoint.load_batch(tmp_path / name)


def test_export_folds_verifies_and_reports(nested: Path, tmp_path: Path) -> None:
    import onnx
    import onnxruntime

    out = tmp_path / "generator.onnx"
    result = cli("export", "--model", "tests.fixtures.hifigan:build_generator", "--checkpoint", str(nested),
                 "--key", "generator", "--input-shape", "2,80,12", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "exporter" in result.stdout and "verifying" in result.stderr
    names = {init.name for init in onnx.load(out).graph.initializer}
    assert "conv_pre.weight" in names and not any("parametrizations" in n for n in names)
    mel = torch.randn(3, 80, 12)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: mel.numpy()})
    with torch.no_grad():
        expected = build_generator("parametrizations")(mel)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    again = cli("export", "--model", "tests.fixtures.hifigan:build_generator", "--input-shape", "1,80,12", "-o", str(out))
    assert again.returncode == 1 and "exists" in again.stderr


def test_fold_finds_state_dicts_in_lists_and_beside_plain_values_and_leaves_optimizer_state(tmp_path: Path, capsys) -> None:
    model = build_generator("legacy")
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 80, 6)).sum().backward()
    optimizer.step()
    with_epoch = {**model.state_dict(), "epoch": 3}
    source, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    torch.save({"generator": with_epoch, "ema": [model.state_dict()], "optim": optimizer.state_dict(), "steps": 10}, source)
    assert checkpoint.state_dict_paths(torch.load(source, weights_only=True)) == [("generator",), ("ema", "0")]
    assert main(["fold", str(source), "-o", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == ["generator: 8 weight-normalized tensors folded",
                                                    "ema.0: 8 weight-normalized tensors folded",
                                                    "optim: an optimizer's state, kept as it was: where it steps g and "
                                                    "v, it does not load into an optimizer of the folded model (resume "
                                                    "training from the unfolded checkpoint)"]
    folded = torch.load(out, weights_only=True)
    expected = wn.fold_weight_norm(model).state_dict()
    for state in (folded["generator"], folded["ema"][0]):
        assert {k: v for k, v in state.items() if k != "epoch"}.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(state[key], expected[key])
    assert folded["generator"]["epoch"] == 3 and folded["steps"] == 10
    assert str(folded["optim"]) == str(optimizer.state_dict())  # untouched
    with pytest.raises(checkpoint.CheckpointError, match="holds only tensors, but epoch is not; use .pt"):
        checkpoint.save_checkpoint(with_epoch, tmp_path / "x.safetensors")


def test_a_model_built_with_some_weight_norm_loads_a_checkpoint_of_it_after_apply(tmp_path: Path) -> None:
    from tests.fixtures.hifigan import build_partly_normalized

    mel = torch.randn(2, 80, 12)
    trained = wn.apply_weight_norm(build_partly_normalized(seed=4), mel)  # existing="keep": conv_pre stays torch's
    path, out = tmp_path / "wn.pt", tmp_path / "g.onnx"
    torch.save(trained.state_dict(), path)
    assert main(["export", "--model", "tests.fixtures.hifigan:build_partly_normalized", "--checkpoint", str(path),
                 "--input-shape", "2,80,12", "-o", str(out)]) == 0
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: mel.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, trained(mel).numpy(), rtol=1e-4, atol=1e-5)


def _trained(kind: str) -> tuple[torch.nn.Module, dict]:
    """A trained model and its checkpoint, whose weight-norm layout differs from the factory's."""
    from tests.fixtures.hifigan import build_partly_normalized
    from tests.fixtures.weight_norm import perturb_scales

    if kind == "partly":  # conv_pre: torch's parametrizations, dim=2 (wav2vec2's pos_conv); the rest: ours
        trained = wn.apply_weight_norm(build_partly_normalized(seed=4), torch.randn(2, 80, 12))
        return trained, wn.convert_state_dict(trained.state_dict(), "legacy")
    trained = perturb_scales(build_generator(kind, seed=4))
    return trained, trained.state_dict()


@pytest.mark.parametrize(("kind", "factory"), [
    ("legacy", "build_generator"),  # legacy weight_g/weight_v keys, a model built with parametrizations
    ("parametrizations", "build_legacy_generator"),
    ("partly", "build_partly_normalized"),  # every pair legacy: conv_pre's renamed, the others folded
])
def test_a_checkpoint_in_the_other_weight_norm_layout_loads_as_torch_would(tmp_path: Path, kind: str, factory: str) -> None:
    trained, state = _trained(kind)
    path, out = tmp_path / "ckpt.pt", tmp_path / "g.onnx"
    torch.save(state, path)
    assert main(["export", "--model", f"tests.fixtures.hifigan:{factory}", "--checkpoint", str(path),
                 "--input-shape", "1,80,12", "-o", str(out)]) == 0
    _assert_onnx_computes(out, trained)


@pytest.mark.parametrize(("command", "name"), [("fold", "out.onnx"), ("convert", "out.onnx"), ("export", "out.pt"),
                                               ("fold", "out.npz"), ("convert", "out.JSON"), ("export", "out"),
                                               ("fold", "out.h5")])
def test_an_output_named_for_the_other_kind_of_file_is_refused_before_any_work(nested: Path, tmp_path: Path, command: str,
                                                                             name: str, capsys) -> None:
    args = {"fold": [str(nested)], "convert": [str(nested), "--to", "legacy"],
            "export": ["--model", MODEL, "--input-shape", "1,80,6"]}[command]
    with pytest.raises(SystemExit) as info:
        main([command, *args, "-o", str(tmp_path / name)])
    assert info.value.code == 2
    expected = ("writes a checkpoint (torch.save's archive: .pt, .pth, .bin..., or .safetensors), not "
                f"{name}" if command != "export" else "name the output *.onnx")
    assert expected in capsys.readouterr().err
    assert not (tmp_path / name).exists()


def test_outputs_get_the_usual_file_mode(nested: Path, tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        for suffix in (".pt", ".safetensors"):
            checkpoint.save_checkpoint(build_plain().state_dict(), tmp_path / f"out{suffix}")
            assert (tmp_path / f"out{suffix}").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


@pytest.mark.parametrize("scale", ["-1", "nan", "0"])
def test_a_bad_init_scale_is_a_usage_error(tmp_path: Path, scale: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["apply", "--model", MODEL, "--preserve", "--init-scale", scale, "-o", str(tmp_path / "o.pt")])
    assert info.value.code == 2 and "--init-scale must be a positive finite number" in capsys.readouterr().err


def test_inspect_shows_only_the_state_dict_under_key(nested: Path, capsys) -> None:
    assert main(["inspect", str(nested), "--key", "generator"]) == 0
    out = capsys.readouterr().out
    assert "generator: 8 weight-normalized tensors" in out and "discriminator" not in out
    assert main(["inspect", str(nested), "--key", "nope"]) == 1
    assert "no state dict under --key nope (found: generator, discriminator)" in capsys.readouterr().err
    # with --model, --key names the same file's state dict when no other --checkpoint is given
    assert main(["inspect", str(nested), "--key", "generator", "--model", MODEL]) == 0
    out = capsys.readouterr().out
    assert "generator: 8 weight-normalized tensors" in out and "discriminator" not in out


def test_an_interrupt_exits_130_and_writes_nothing(nested: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("wn_transform.cli.fold_one_state_dict", interrupted)
    assert main(["fold", str(nested), "-o", str(tmp_path / "o.pt")]) == 130
    assert "interrupted; no output was written" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_an_opset_the_exporter_cannot_write_is_an_error_and_no_file(tmp_path: Path, capsys) -> None:
    out = tmp_path / "g.onnx"
    assert main(["export", "--model", MODEL, "--input-shape", "1,80,6", "--opset", "3", "-o", str(out)]) == 1
    assert "opset 3 was asked for, but the" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec", ["0=batch,2=frames", "mel:2=frames,mel:0"])  # by position or the forward's name
def test_dynamic_names_the_axes_the_graph_keeps_dynamic(spec: str, tmp_path: Path) -> None:
    """A vocoder's time axis: exported dynamic, and the file runs at another length and batch."""
    import onnxruntime

    out = tmp_path / "g.onnx"
    assert main(["export", "--model", MODEL, "--input-shape", "2,80,12", "--dynamic", spec, "-o", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 80, "frames"]
    mel = torch.randn(3, 80, 20)
    (got,) = session.run(None, {"mel": mel.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, build_plain()(mel).numpy(), rtol=1e-4, atol=1e-5)


def test_exporter_chooses_torchs_onnx_exporter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.onnx"
    assert main(["export", "--model", MODEL, "--input-shape", "2,80,12", "--exporter", "torchscript", "-o", str(out)]) == 0
    assert re.search(r"exporter\W+torchscript", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["export", "--model", MODEL, "--input-shape", "2,80,12", "--exporter", "tf", "-o", str(out)])
    assert "invalid choice: 'tf'" in capsys.readouterr().err


def test_dynamic_none_fixes_every_shape(tmp_path: Path) -> None:
    import onnxruntime

    out = tmp_path / "g.onnx"
    assert main(["export", "--model", MODEL, "--input-shape", "2,80,12", "--dynamic", "none", "-o", str(out)]) == 0
    assert onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_inputs()[0].shape == [2, 80, 12]


@pytest.mark.parametrize(("spec", "error"), [
    ("x", "argument --dynamic: 'x' is not [INPUT:]AXIS[=NAME]"),
    ("2=no-name", "'2=no-name' is not"),
    (":2", "':2' is not"),
    ("3=t", "input '0' has shape [1, 80, 6], no axis 3"),
    ("speech:2", "--dynamic names 'speech', but the batch's inputs are '0' (mel)"),
])
def test_a_bad_dynamic_axis_is_a_usage_error_naming_it(spec: str, error: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "--model", MODEL, "--input-shape", "1,80,6", "--dynamic", spec, "-o", str(tmp_path / "g.onnx")])
    assert info.value.code == 2 and error in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


class _Cat(torch.nn.Module):
    """Two inputs whose time axes may differ: ``cat(conv(a), conv(b), dim=2)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv1d(3, 4, 3, padding=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(a), self.conv(b)], dim=2)


class _VarKeyword(_Cat):
    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return super().forward(inputs["a"], inputs["b"])


def build_cat() -> torch.nn.Module:
    return _Cat()


@pytest.mark.parametrize(("spec", "error"), [
    ("2=T", "'T' names a[2] (8) and b[2] (6)"),
    ("a:2=T,b:2=T", "'T' names a[2] (8) and b[2] (6)"),
    ("0", "'batch' names a[0] (2) and b[0] (3)"),
])
def test_one_dynamic_name_for_axes_of_different_sizes_is_a_usage_error(spec: str, error: str, tmp_path: Path,
                                                                     capsys) -> None:
    sample = tmp_path / "ab.pt"
    torch.save((torch.randn(2, 3, 8), torch.randn(3 if spec == "0" else 2, 3, 6)), sample)
    with pytest.raises(SystemExit) as info:
        main(["export", "--model", "tests.test_cli:build_cat", "--sample", str(sample), "--dynamic", spec,
              "-o", str(tmp_path / "g.onnx")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and error in err and "give them different names" in err
    assert not (tmp_path / "g.onnx").exists()


def test_an_unnamed_axis_of_several_inputs_gets_a_name_per_input(tmp_path: Path) -> None:
    import onnxruntime

    sample, out = tmp_path / "ab.pt", tmp_path / "g.onnx"
    torch.save((torch.randn(2, 3, 8), torch.randn(2, 3, 6)), sample)
    assert main(["export", "--model", "tests.test_cli:build_cat", "--sample", str(sample), "--dynamic", "2",
                 "-o", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [[2, 3, "a_dim2"], [2, 3, "b_dim2"]]
    from wn_transform.cli import _DynamicAxis, _dynamic_shapes

    assert _dynamic_shapes((_DynamicAxis(None, 2, None),), torch.randn(1, 80, 6), build_plain()) == ({2: "dim2"},)


def test_dynamic_shapes_of_a_dict_batch_are_keyed_by_the_forwards_arguments() -> None:
    """A ``forward(self, **inputs)``: torch.export wants the keys it collects under ``inputs``."""
    from wn_transform.cli import _DynamicAxis, _dynamic_shapes

    batch = {"a": torch.randn(2, 3, 8), "b": torch.randn(2, 3, 6)}
    axes = (_DynamicAxis("a", 2, "frames"), _DynamicAxis(None, 0, None))
    expected = {"a": {2: "frames", 0: "batch"}, "b": {0: "batch"}}
    assert _dynamic_shapes(axes, batch, _VarKeyword()) == {"inputs": expected}
    assert _dynamic_shapes(axes, batch, _Cat()) == expected


def test_an_unwritable_folder_is_named_not_the_temporary_file(tmp_path: Path, monkeypatch) -> None:
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", read_only)
    with pytest.raises(checkpoint.CheckpointError, match=r"o\.pt: cannot write in .* \(Read-only file system\)"):
        checkpoint.save_checkpoint({"w": torch.zeros(1)}, tmp_path / "o.pt")


def test_a_1d_weight_folds_per_element_through_the_cli(tmp_path: Path) -> None:
    from tests.fixtures.weight_norm import legacy_weight_norm

    layer = legacy_weight_norm(torch.nn.LayerNorm(4), dim=0)
    with torch.no_grad():
        layer.weight_v.copy_(torch.tensor([0.5, -2.0, 3.0, 1.0]))
        layer.weight_g.copy_(torch.tensor([0.5, 2.0, 3.0, 1.0]))
    source, out = tmp_path / "ln.pt", tmp_path / "plain.pt"
    torch.save(layer.state_dict(), source)
    assert main(["fold", str(source), "-o", str(out)]) == 0
    torch.testing.assert_close(torch.load(out, weights_only=True)["weight"], torch.tensor([0.5, -2.0, 3.0, 1.0]))


def _problems(stderr: str) -> list[str]:
    """The lines of ``stderr`` other than the timed progress lines."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("[")]


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("command", ["fold", "export"])
def test_an_output_that_is_not_a_regular_file_is_never_replaced(nested: Path, tmp_path: Path, force: bool, command: str,
                                                                capsys) -> None:
    fifo = tmp_path / ("out.onnx" if command == "export" else "out.pt")
    os.mkfifo(fifo)
    args = ([str(nested)] if command == "fold" else ["--model", MODEL, "--input-shape", "1,80,6"]) + ["-o", str(fifo)]
    assert main([command, *args] + (["--force"] if force else [])) == 1
    err = capsys.readouterr().err
    assert f"{fifo}: is not a regular file (a FIFO)" in err and len(err.strip().splitlines()) == 1
    assert fifo.is_fifo()
    with pytest.raises(checkpoint.CheckpointError, match="is not a regular file"):
        checkpoint.save_checkpoint({"w": torch.ones(1)}, fifo, force=True)
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", fifo.name]


def test_an_existing_folder_as_output_is_named_a_folder_without_force(nested: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "out.pt"
    folder.mkdir()
    assert main(["fold", str(nested), "-o", str(folder)]) == 1
    assert f"{folder}: is a folder; give the path" in capsys.readouterr().err


class _ExtraState(torch.nn.Module):
    """A module whose extra state is a dict holding a tensor (as FP8 and quantized modules have)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 4))
        self.amax = torch.ones(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)

    def get_extra_state(self) -> dict:
        return {"amax": self.amax, "fmt": "e4m3"}

    def set_extra_state(self, state: dict) -> None:
        self.amax = state["amax"]


def test_a_state_dict_with_nested_tensors_is_still_the_state_dict(tmp_path: Path, capsys) -> None:
    from tests.fixtures.weight_norm import legacy_weight_norm

    model = torch.nn.Sequential(_ExtraState(), legacy_weight_norm(torch.nn.Linear(4, 2)))
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    for name, saved in [("extra", model.state_dict()), ("flat", {**model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3})]:
        source, out = tmp_path / f"{name}.pt", tmp_path / f"{name}_plain.pt"
        torch.save(saved, source)
        assert checkpoint.state_dict_paths(torch.load(source, weights_only=True)) == [()]
        assert main(["fold", str(source), "-o", str(out)]) == 0
        assert capsys.readouterr().out.splitlines()[0] == "(top level): 2 weight-normalized tensors folded"
        folded = torch.load(out, weights_only=True)
        assert str(folded["0._extra_state"]) == str(saved["0._extra_state"]) and "1.weight" in folded
        if name == "flat":
            assert folded["epoch"] == 3 and str(folded["optimizer"]) == str(optimizer.state_dict())


def test_callback_scores_and_param_groups_are_not_state_dicts() -> None:
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3))
    ckpt = {"epoch": 3, "state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()],
            "callbacks": {"ModelCheckpoint{'monitor': 'val_loss'}": {
                "best_model_score": torch.tensor(0.25), "best_k_models": {"/ckpts/epoch=3-step=30.ckpt": torch.tensor(0.25)}}},
            "by_path": {"runs/a b.ckpt": torch.ones(3)}, "scores": {"val_loss": torch.tensor(0.5)}}
    assert checkpoint.state_dict_paths(ckpt) == [("state_dict",)]


def test_a_tensor_beside_a_nested_state_dict_leaves_it_the_state_dict(tmp_path: Path) -> None:
    """``{"model": state_dict, "mel_basis": tensor}``: both are listed (the top level holds a tensor
    of its own), and loading into a model without --key takes ``model``, the only one that fits."""
    state = build_generator("legacy").state_dict()
    ckpt = {"model": state, "mel_basis": torch.randn(80, 513)}
    assert checkpoint.state_dict_paths(ckpt) == [(), ("model",)]
    extra = {**state, "conv_pre._extra_state": {"amax": torch.ones(1), "fmt": "e4m3"}}
    assert checkpoint.state_dict_paths(extra) == [()]
    source = tmp_path / "ckpt.pt"
    torch.save(ckpt, source)
    assert main(["apply", "--model", MODEL, "--checkpoint", str(source), "--preserve", "-o", str(tmp_path / "o.pt")]) == 0


def _wn_conv_state(seed: int) -> dict[str, torch.Tensor]:
    """A small legacy weight-normalized ``Sequential(Conv1d)``'s state dict (weight_g, weight_v, bias)."""
    from tests.fixtures.weight_norm import legacy_weight_norm

    torch.manual_seed(seed)
    return torch.nn.Sequential(legacy_weight_norm(torch.nn.Conv1d(4, 4, 3))).state_dict()


def build_conv() -> torch.nn.Module:
    """The plain model ``_wn_conv_state`` loads into."""
    return torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3))


def test_state_dicts_beside_more_top_level_buffers_are_each_found_folded_and_chosen(tmp_path: Path, capsys) -> None:
    """``{"model": sd, "ema": sd}`` with more top-level tensors than the small model has: each
    state dict is found and folded; loading needs --key (both fit), and --key ema loads ema."""
    model, ema = _wn_conv_state(0), _wn_conv_state(1)
    ckpt = {"model": model, "ema": ema, "mel_basis": torch.randn(8, 5), "window": torch.hann_window(16),
            "best_loss": torch.tensor([0.5])}
    source, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    torch.save(ckpt, source)
    assert checkpoint.state_dict_paths(ckpt) == [(), ("model",), ("ema",)]
    assert main(["fold", str(source), "-o", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["model: 1 weight-normalized tensors folded",
                                                        "ema: 1 weight-normalized tensors folded"]
    folded = torch.load(out, weights_only=True)
    for name in ("model", "ema"):
        assert sorted(folded[name]) == ["0.bias", "0.weight"]
    torch.testing.assert_close(folded["mel_basis"], ckpt["mel_basis"])
    assert main(["inspect", str(source), "--key", "ema"]) == 0
    assert capsys.readouterr().out.startswith("ema: 1 weight-normalized tensors")
    common = ["apply", "--model", "tests.test_cli:build_conv", "--checkpoint", str(source), "--preserve"]
    assert main([*common, "-o", str(tmp_path / "a.pt")]) == 1
    assert "holds 2 state dicts that fit tests.test_cli:build_conv (model, ema); choose one with --key" in capsys.readouterr().err
    assert main([*common, "--key", "ema", "-o", str(tmp_path / "b.pt")]) == 0
    applied = wn.fold_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    torch.testing.assert_close(applied["0.weight"], folded["ema"]["0.weight"])


def test_a_state_dict_inside_a_flat_state_dict_is_folded_too(tmp_path: Path, capsys) -> None:
    """A flat state dict holding an equal-size ``"ema": sd``: both are folded, and loading without
    --key asks which (both fit)."""
    state = {**_wn_conv_state(0), "ema": _wn_conv_state(1), "epoch": 3}
    source, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    torch.save(state, source)
    assert checkpoint.state_dict_paths(state) == [(), ("ema",)]
    assert main(["fold", str(source), "-o", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == ["(top level): 1 weight-normalized tensors folded",
                                                    "ema: 1 weight-normalized tensors folded"]
    folded = torch.load(out, weights_only=True)
    assert sorted(folded) == ["0.bias", "0.weight", "ema", "epoch"] and sorted(folded["ema"]) == ["0.bias", "0.weight"]
    assert main(["inspect", "--model", "tests.test_cli:build_conv", "--checkpoint", str(source)]) == 1
    assert "holds 2 state dicts that fit" in capsys.readouterr().err
    assert main(["inspect", "--model", "tests.test_cli:build_conv", "--checkpoint", str(source), "--key", "(top level)"]) == 0


def test_key_selects_a_path_whose_keys_hold_dots(tmp_path: Path, capsys) -> None:
    state = build_generator("legacy").state_dict()
    source = tmp_path / "ckpt.pt"
    torch.save({"model.ema": state, "callbacks": {"EMA{'decay': 0.999}": {"ema_state_dict": state}}}, source)
    assert main(["inspect", str(source), "--key", "nope"]) == 1
    listed = capsys.readouterr().err.split("(found: ")[1].rstrip().rstrip(")")
    assert listed == "model.ema, callbacks.EMA{'decay': 0.999}.ema_state_dict"
    for key in listed.split(", "):
        assert main(["inspect", str(source), "--key", key]) == 0
        assert capsys.readouterr().out.startswith(f"{key}: 8 weight-normalized tensors")
    assert main(["apply", "--model", MODEL, "--checkpoint", str(source), "--key", "model.ema", "--preserve",
                 "-o", str(tmp_path / "o.pt")]) == 0


@pytest.mark.parametrize("shape", ["2,-4", "0", "1,0,3", "", "1,,2", "a"])
def test_a_bad_input_shape_is_a_usage_error(shape: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--model", MODEL, "--input-shape", shape])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "argument --input-shape" in err and "Traceback" not in err


def test_a_shape_too_large_to_allocate_is_a_one_line_error(capsys) -> None:
    assert main(["inspect", "--model", MODEL, "--input-shape", "100000000,100000000,100000"]) == 1
    err = capsys.readouterr().err
    assert "--input-shape 100000000,100000000,100000" in err and len(_problems(err)) == 1


def test_a_meta_tensor_cannot_go_to_safetensors(tmp_path: Path, capsys) -> None:
    source, out = tmp_path / "m.pt", tmp_path / "m.safetensors"
    torch.save({"lin.weight_g": torch.ones(2, 1), "lin.weight_v": torch.randn(2, 3), "buf": torch.empty(3, device="meta")}, source)
    assert main(["fold", str(source), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert _problems(err) == [f"wn-transform fold: error: {out}: buf is a meta tensor (a shape, no values), which "
                              "safetensors cannot store; use .pt, or load real weights first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_ordered_dicts_metadata_and_safetensors_metadata_are_kept(tmp_path: Path) -> None:
    state = build_generator("parametrizations").state_dict()
    source, out = tmp_path / "ckpt.pt", tmp_path / "out.pt"
    torch.save({"generator": state, "hparams": OrderedDict(lr=1e-3)}, source)
    for command in (["fold"], ["convert", "--to", "legacy"]):
        assert main([*command, str(source), "-o", str(out), "--force"]) == 0
        result = torch.load(out, weights_only=True)
        assert type(result["generator"]) is OrderedDict and type(result["hparams"]) is OrderedDict
        assert result["generator"]._metadata[""] == state._metadata[""]
    flat, flat_out = tmp_path / "g.safetensors", tmp_path / "plain.safetensors"
    save_file(dict(state), flat, metadata={"format": "pt"})
    assert main(["fold", str(flat), "-o", str(flat_out)]) == 0
    with safe_open(flat_out, "pt") as file:
        assert file.metadata() == {"format": "pt"}


def test_convert_to_the_layout_a_checkpoint_already_has_says_so(tmp_path: Path, capsys) -> None:
    source = tmp_path / "legacy.pt"
    torch.save(build_generator("legacy").state_dict(), source)
    assert main(["convert", str(source), "-o", str(tmp_path / "o.pt"), "--to", "legacy"]) == 1
    assert "already in the legacy layout; nothing to convert" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_data_parallel_and_compile_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    source = tmp_path / "ckpt.pt"
    torch.save({f"{prefix}{k}": v for k, v in build_generator("legacy").state_dict().items()}, source)
    assert main(["apply", "--model", MODEL, "--checkpoint", str(source), "--preserve", "-o", str(tmp_path / "o.pt")]) == 0


def build_var_keyword() -> torch.nn.Module:
    return _VarKeyword()


def test_a_var_keyword_forward_exports_with_the_axes_asked_for(tmp_path: Path, capsys) -> None:
    """torch.export refuses dynamic shapes nested under ``**inputs`` (torch 2.13): the inputs go to
    the dynamo exporter flat, each keyword input's axes as a top-level input's."""
    import onnxruntime

    sample, out = tmp_path / "ab.pt", tmp_path / "g.onnx"
    torch.save({"a": torch.randn(2, 3, 8), "b": torch.randn(2, 3, 6)}, sample)
    assert main(["export", "--model", "tests.test_cli:build_var_keyword", "--sample", str(sample),
                 "--dynamic", "a:2=frames,0", "-o", str(out)]) == 0
    assert re.search(r"^exporter +dynamo$", capsys.readouterr().out, re.M)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.shape for i in session.get_inputs()] == [["batch", 3, "frames"], ["batch", 3, 6]]


def test_a_state_dict_with_plain_values_keeps_its_metadata_through_a_fold() -> None:
    """``{**model.state_dict(), "epoch": 3}``: still an ``OrderedDict`` with ``_metadata`` once folded."""
    state = build_generator("parametrizations").state_dict()
    state["epoch"] = 3
    folded = checkpoint.map_state_dicts(state, wn.fold_state_dict)
    assert type(folded) is OrderedDict and folded["epoch"] == 3 and "conv_pre.weight" in folded
    assert folded._metadata[""] == state._metadata[""]


def test_key_top_level_writes_the_top_level_state_dict_without_the_ones_it_holds(tmp_path: Path, capsys) -> None:
    """``{**sd, "ema": sd_of_the_average}`` (a shape README names): ``--key "(top level)"`` writes the
    top-level weights alone, folded, which a .safetensors output can hold; ``--key ema`` the other."""
    model = build_generator("parametrizations")
    state = model.state_dict()
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({**state, "ema": {k: v * 1 for k, v in state.items()}}, checkpoint)
    out = tmp_path / "top.safetensors"
    assert main(["fold", str(checkpoint), "--key", "(top level)", "-o", str(out)]) == 0
    assert capsys.readouterr().out.startswith("(top level): ")
    assert main(["fold", str(checkpoint), "--key", "ema", "-o", str(tmp_path / "ema.safetensors")]) == 0
    assert capsys.readouterr().out.startswith("ema: ")  # named as the file names it
    folded = load_file(out)
    expected = wn.fold_weight_norm(model).state_dict()
    assert folded.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(folded[key], expected[key])


def test_an_output_path_ending_with_a_separator_is_refused_and_nothing_is_written(nested: Path, tmp_path: Path,
                                                                                   capsys) -> None:
    """``-o plain_ckpts/`` for a folder that does not exist: a folder was meant, not a file named so."""
    assert main(["fold", str(nested), "--key", "generator", "-o", f"{tmp_path / 'plain_ckpts'}/"]) == 1
    assert "names a folder (it ends with a separator)" in capsys.readouterr().err
    assert not (tmp_path / "plain_ckpts").exists()


def test_key_takes_a_lightning_modules_attribute_prefix_where_a_model_is_loaded(tmp_path: Path) -> None:
    """A LightningModule with ``self.generator`` and ``self.discriminator`` saves one flat state dict,
    ``{"state_dict": {"generator.conv_pre.weight_g": ...}}``: ``--key generator`` loads the
    generator's keys, the prefix taken off, into the model to export."""
    generator = build_generator("legacy")
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {f"generator.{k}": v for k, v in generator.state_dict().items()}
    state |= {f"discriminator.{k}": v for k, v in build_plain().state_dict().items()}
    path, out = tmp_path / "last.ckpt", tmp_path / "g.onnx"
    torch.save({"state_dict": state, "epoch": 3, "optimizer_states": []}, path)
    assert main(["export", "--model", MODEL, "--checkpoint", str(path), "--key", "generator",
                 "--input-shape", "1,80,12", "-o", str(out)]) == 0
    _assert_onnx_computes(out, generator)


def _assert_onnx_computes(path: Path, model: torch.nn.Module) -> None:
    """The ONNX file at ``path`` gives ``model``'s output (eval mode) on a random mel ``[1, 80, 12]``."""
    import onnxruntime

    mel = torch.randn(1, 80, 12)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: mel.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model.eval()(mel).numpy(), rtol=1e-4, atol=1e-5)


class _TiedLanguageModel(torch.nn.Module):
    """An embedding and an output layer that share one Parameter (``tie_word_embeddings``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 8)
        self.mix = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def build_tied() -> torch.nn.Module:
    return _TiedLanguageModel()


def test_a_checkpoint_that_holds_a_tied_weight_once_loads(tmp_path: Path) -> None:
    """``save_pretrained`` writes a tied Parameter under one of its names: the other is not missing."""
    trained = wn.apply_weight_norm(build_tied(), torch.randint(0, 20, (4, 6)))
    state = {k: v for k, v in trained.state_dict().items() if k != "head.weight"}
    assert "emb.weight" in state
    save_file(state, tmp_path / "model.safetensors")
    sample = tmp_path / "ids.pt"
    torch.save(torch.randint(0, 20, (2, 6)), sample)
    result = cli("export", "--model", "tests.test_cli:build_tied", "--checkpoint", str(tmp_path / "model.safetensors"),
                 "--sample", str(sample), "-o", str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr
    state.pop("emb.weight")  # now the tied pair is missing for real
    save_file(state, tmp_path / "short.safetensors")
    result = cli("inspect", "--model", "tests.test_cli:build_tied", "--checkpoint", str(tmp_path / "short.safetensors"))
    assert result.returncode == 1 and "missing keys emb.weight, head.weight" in result.stderr


def _shard(state: dict, folder: Path, parts: int) -> Path:
    """``state`` written as Hugging Face shards it (``model-0000k-of-0000n.safetensors`` and an
    index), in key order, split every few keys: a g and its v can land in different shards."""
    keys = list(state)
    size = -(-len(keys) // parts)
    weight_map = {}
    for part in range(parts):
        name = f"model-{part + 1:05d}-of-{parts:05d}.safetensors"
        chunk = keys[part * size:(part + 1) * size]
        save_file({k: state[k].contiguous() for k in chunk}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, name))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def test_a_sharded_checkpoint_is_read_whole_through_its_index_and_a_shard_alone_is_refused(tmp_path: Path) -> None:
    state = build_generator("parametrizations").state_dict()
    index = _shard(state, tmp_path, 3)
    assert main(["fold", str(index), "-o", str(tmp_path / "plain.safetensors")]) == 0
    folded = load_file(tmp_path / "plain.safetensors")
    expected = wn.fold_state_dict(state)
    assert folded.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(folded[key], expected[key], msg=key)
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as file:
        assert file.metadata() == {"format": "pt"}
    shard = tmp_path / "model-00002-of-00003.safetensors"
    result = cli("fold", str(shard), "-o", str(tmp_path / "part.safetensors"))
    assert result.returncode == 1 and not (tmp_path / "part.safetensors").exists()
    assert f"one shard of a sharded checkpoint (a weight-norm pair may be split across shards); pass its index, {index}" \
        in result.stderr
    result = cli("fold", str(index), "-o", str(shard), "--force")  # an input file, even with --force
    assert result.returncode == 1 and load_file(shard).keys() <= state.keys()


def test_a_shard_holding_only_0_d_tensors_is_read(tmp_path: Path) -> None:
    """Hugging Face shards by size: CLIP's 0-d ``logit_scale`` (or a whole-tensor norm's g) can land
    alone in the last shard, which is no state dict of its own but is a shard all the same."""
    state = {**build_generator("parametrizations").state_dict(), "logit_scale": torch.tensor(2.6592)}
    index = _shard(state, tmp_path, len(state))  # a key per shard: the last holds the 0-d tensor alone
    assert main(["fold", str(index), "-o", str(tmp_path / "plain.safetensors")]) == 0
    folded, expected = load_file(tmp_path / "plain.safetensors"), wn.fold_state_dict(state)
    assert folded.keys() == expected.keys()
    torch.testing.assert_close(folded["logit_scale"], state["logit_scale"])
    torch.save([torch.ones(2)], tmp_path / "pytorch_model-00001-of-00001.bin")  # no mapping of names
    bin_index = tmp_path / "pytorch_model.bin.index.json"
    bin_index.write_text(json.dumps({"weight_map": {"x": "pytorch_model-00001-of-00001.bin"}}))
    with pytest.raises(checkpoint.CheckpointError, match="pytorch_model-00001-of-00001.bin: a shard of pytorch_model.bin."
                                                         "index.json that holds no state dict"):
        checkpoint.load_checkpoint(bin_index)


def test_fold_keep_leaves_the_weight_norm_a_model_is_built_with(tmp_path: Path) -> None:
    from tests.test_fold import _BuiltWithWeightNorm

    source, out = tmp_path / "ckpt.pt", tmp_path / "plain.safetensors"
    model = wn.apply_weight_norm(_BuiltWithWeightNorm(), torch.randn(6, 4, 10))
    torch.save(model.state_dict(), source)
    result = cli("fold", str(source), "--keep", "pos.weight", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "(top level): 2 weight-normalized tensors folded (1 kept)" in result.stdout
    fresh = _BuiltWithWeightNorm()
    fresh.load_state_dict(load_file(out))
    x = torch.randn(2, 4, 10)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert "kernel axis" not in result.stdout
    result = cli("fold", str(source), "--keep", "head.bias", "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 1 and "--keep names head.bias, which is not weight-normalized in any of its state dicts" in result.stderr
    result = cli("fold", str(source), "-o", str(tmp_path / "all.pt"))  # the built-in one folded too: said, with the way back
    assert result.returncode == 0, result.stderr
    assert ("(top level): pos.weight was normalized on dim 2, a kernel axis, as a model that builds weight norm into its "
            "class does (wav2vec2's pos_conv): where the file must load into that class, keep it with --keep pos.weight"
            in result.stdout)
    assert result.stdout.count("kernel axis") == 1  # (the layers ours normalized per output channel: not named)


def test_a_checkpoint_whose_tied_names_disagree_is_refused(tmp_path: Path) -> None:
    state = build_tied().state_dict()
    state["head.weight"] = torch.zeros_like(state["head.weight"])  # the file's two copies of one Parameter differ
    torch.save(state, tmp_path / "ckpt.pt")
    result = cli("apply", "--model", "tests.test_cli:build_tied", "--checkpoint", str(tmp_path / "ckpt.pt"), "--preserve",
                 "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 1 and not (tmp_path / "o.pt").exists()
    assert "holds different values for names that are one Parameter in tests.test_cli:build_tied (tied): " \
           "emb.weight and head.weight" in result.stderr


def test_a_sharded_key_is_read_from_the_shard_its_index_names(tmp_path: Path) -> None:
    """A stale copy of a key in another shard is not read; a key the index does not list is an error."""
    state = build_generator("parametrizations").state_dict()
    index = _shard(state, tmp_path, 2)
    key = next(iter(state))
    stale = tmp_path / "model-00002-of-00002.safetensors"
    save_file({**load_file(stale), key: torch.full_like(state[key], 9.0)}, stale, metadata={"format": "pt"})
    torch.testing.assert_close(checkpoint.load_checkpoint(index)[key], state[key])
    save_file({**load_file(stale), "extra.weight": torch.ones(2, 2)}, stale)
    with pytest.raises(checkpoint.CheckpointError, match=r"holds keys its index model\.safetensors\.index\.json does not list: "
                                                         r"extra\.weight"):
        checkpoint.load_checkpoint(index)
    index.write_text(json.dumps({"weight_map": {key: 1}}))
    result = cli("fold", str(index), "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 1 and "its 'weight_map' must map each key to a shard file name" in result.stderr
    index.write_text(json.dumps({"weight_map": {key: "../elsewhere.safetensors"}}))
    result = cli("fold", str(index), "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 1 and "names shard files outside its folder (../elsewhere.safetensors)" in result.stderr


def test_fold_and_convert_take_a_lightning_modules_attribute_prefix_as_inspect_does(tmp_path: Path) -> None:
    """``--key generator`` on ``{"state_dict": {"generator.*": ..., "discriminator.*": ...}}``: the
    generator's keys, the prefix taken off, written alone (what a deploy step extracts)."""
    generator = build_generator("legacy")
    state = {f"generator.{k}": v for k, v in generator.state_dict().items()}
    state |= {f"discriminator.{k}": v for k, v in build_plain().state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    out = tmp_path / "g.safetensors"
    result = cli("fold", str(path), "--key", "generator", "-o", str(out))
    assert result.returncode == 0, result.stderr
    plain = build_plain()
    plain.load_state_dict(load_file(out))
    mel = torch.randn(1, 80, 12)
    with torch.no_grad():
        torch.testing.assert_close(plain(mel), generator(mel))
    converted = tmp_path / "g.pt"
    assert cli("convert", str(path), "--key", "generator", "--to", "parametrizations", "-o", str(converted)).returncode == 0
    assert list(torch.load(converted)) == list(wn.convert_state_dict(generator.state_dict(), "parametrizations"))


def test_an_averaged_models_weights_load_and_a_hint_under_key_keeps_the_key(tmp_path: Path) -> None:
    """``AveragedModel(model).state_dict()`` is ``n_averaged`` beside ``module.*``: the prefix is
    taken off and the count left out, bare or under a LightningModule's ``ema_model.``; a
    hint about a further prefix under ``--key net`` names ``--key net.inner``, which works."""
    from torch.optim.swa_utils import AveragedModel

    generator = build_generator("parametrizations")
    averaged = AveragedModel(generator)
    averaged.update_parameters(generator)
    model = "tests.fixtures.hifigan:build_plain"
    checkpoints = {"swa.pt": averaged.state_dict(),
                   "lit.ckpt": {"state_dict": {f"ema_model.{k}": v for k, v in averaged.state_dict().items()}, "epoch": 1}}
    mel = torch.randn(1, 80, 12)
    for name, content in checkpoints.items():
        torch.save(content, tmp_path / name)
        out = tmp_path / f"{name}.out.pt"
        key = ("--key", "ema_model") if name == "lit.ckpt" else ()
        result = cli("apply", "--model", model, "--checkpoint", str(tmp_path / name), *key, "--preserve", "-o", str(out))
        assert result.returncode == 0, result.stderr
        loaded = wn.apply_weight_norm(build_plain(), init="preserve")
        loaded.load_state_dict(torch.load(out))
        with torch.no_grad():
            torch.testing.assert_close(loaded(mel), generator(mel))
    nested = {"state_dict": {f"net.inner.{k}": v for k, v in generator.state_dict().items()}}
    torch.save(nested, tmp_path / "nested.ckpt")
    args = ("apply", "--model", model, "--checkpoint", str(tmp_path / "nested.ckpt"), "--preserve")
    result = cli(*args, "--key", "net", "-o", str(tmp_path / "a.pt"))
    assert result.returncode == 1 and "(the keys under 'inner.' fit it: choose them with --key net.inner)" in result.stderr
    assert cli(*args, "--key", "net.inner", "-o", str(tmp_path / "b.pt")).returncode == 0


def test_convert_renames_an_optimizers_parameter_names_and_fold_says_what_its_optimizer_state_is(tmp_path: Path) -> None:
    """An optimizer made from ``named_parameters()`` keeps the names in its ``param_groups``: convert
    renames them with the pairs, and the state resumes in the converted model's optimizer with
    the same moments; fold keeps it as it was and says it steps g and v."""
    model = build_generator("parametrizations")
    optimizer = torch.optim.Adam(model.named_parameters())
    model(torch.randn(1, 80, 6)).sum().backward()
    optimizer.step()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}, path)
    result = cli("convert", str(path), "--to", "legacy", "-o", str(tmp_path / "legacy.ckpt"))
    assert result.returncode == 0, result.stderr
    pairs = len(wn.find_state_dict_weight_norms(model.state_dict()))
    assert f"optimizer_states.0: an optimizer's state: {2 * pairs} parameter names (param_names) renamed" in result.stdout
    converted = torch.load(tmp_path / "legacy.ckpt")
    legacy = build_generator("legacy")
    legacy.load_state_dict(converted["state_dict"])
    resumed = torch.optim.Adam(legacy.named_parameters())
    resumed.load_state_dict(converted["optimizer_states"][0])
    (names,) = [group["param_names"] for group in converted["optimizer_states"][0]["param_groups"]]
    assert names == [name for name, _ in legacy.named_parameters()]
    for p, q in zip(legacy.parameters(), model.parameters(), strict=True):  # the moments follow their parameters
        torch.testing.assert_close(resumed.state[p]["exp_avg"], optimizer.state[q]["exp_avg"])
    result = cli("fold", str(path), "-o", str(tmp_path / "plain.ckpt"))
    assert result.returncode == 0, result.stderr
    assert "optimizer_states.0: an optimizer's state, kept as it was: where it steps g and v" in result.stdout
    # a discriminator whose own plain parameter is named as one of the generator's pairs (an
    # attention's value projection, conv_pre.weight_v): its optimizer is renamed by its own state dict
    discriminator = torch.nn.Module()
    discriminator.conv_pre = torch.nn.Module()
    discriminator.conv_pre.weight_v = torch.nn.Parameter(torch.randn(4, 4))
    legacy_optimizer = torch.optim.Adam(build_generator("legacy").named_parameters())
    plain_optimizer = torch.optim.Adam(discriminator.named_parameters())
    torch.save({"generator": build_generator("legacy").state_dict(), "discriminator": discriminator.state_dict(),
                "optim_g": legacy_optimizer.state_dict(), "optim_d": plain_optimizer.state_dict()}, tmp_path / "gan.pt")
    result = cli("convert", str(tmp_path / "gan.pt"), "--to", "parametrizations", "-o", str(tmp_path / "gan_p.pt"))
    assert result.returncode == 0, result.stderr
    converted = torch.load(tmp_path / "gan_p.pt")
    assert "moments it holds for s = log g" not in result.stdout  # (no g = e^s pair there)
    assert converted["optim_d"]["param_groups"][0]["param_names"] == ["conv_pre.weight_v"]
    assert converted["optim_g"]["param_groups"][0]["param_names"] == [
        name for name, _ in build_generator("parametrizations").named_parameters()]


class _Unrolled(torch.nn.Module):
    """Its weight reaches ``F.linear`` in a loop over the rows: symbolic tracing cannot follow it,
    and the module walk sees no standard layer; torch.export, given a batch, finds it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 6) * 0.3)
        self.b = torch.nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.nn.functional.linear(x[i], self.w, self.b) for i in range(x.shape[0])])


def build_unrolled() -> torch.nn.Module:
    torch.manual_seed(0)
    return _Unrolled()


def test_apply_preserve_takes_a_sample_batch_to_find_the_weights_and_says_so_when_it_needs_one(tmp_path: Path) -> None:
    source, out = tmp_path / "plain.pt", tmp_path / "wn.pt"
    model = build_unrolled()
    torch.save(model.state_dict(), source)
    args = ("apply", "--model", "tests.test_cli:build_unrolled", "--checkpoint", str(source), "--preserve", "-o", str(out))
    result = cli(*args)
    assert result.returncode == 1 and not out.exists()
    assert "pass a sample batch (--sample FILE or --input-shape N,C,...) so that torch.export can trace it" in result.stderr
    result = cli("inspect", "--model", "tests.test_cli:build_unrolled")
    assert result.returncode == 1
    assert "pass a sample batch (--sample FILE or --input-shape N,C,...) so that torch.export can trace it" in result.stderr
    result = cli(*args, "--input-shape", "3,6")
    assert result.returncode == 0, result.stderr
    assert "1 weights reparameterized, 0 skipped; traced by torch.export; init=preserve" in result.stdout
    normalized = wn.apply_weight_norm(build_unrolled(), torch.randn(3, 6), init="preserve")
    normalized.load_state_dict(torch.load(out))
    x = torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(normalized(x), model(x))
    torch.save(torch.randn(3, 6), tmp_path / "batch.pt")
    result = cli("apply", "--model", "tests.test_cli:build_unrolled", "--calib", str(tmp_path / "batch.pt"), "--sample",
                 str(tmp_path / "batch.pt"), "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 2 and "--sample goes with --preserve" in result.stderr


def test_converting_g_equals_e_to_the_s_says_what_the_kept_optimizer_state_holds(tmp_path: Path) -> None:
    """An exp_scale checkpoint's s = log g becomes g: the optimizer's moments kept for s now stand
    beside g, which the output says, naming the optimizer state."""
    model = wn.apply_weight_norm(torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.randn(8, 4), exp_scale=True)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    torch.save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "e.pt")
    result = cli("convert", str(tmp_path / "e.pt"), "--to", "parametrizations", "-o", str(tmp_path / "p.pt"))
    assert result.returncode == 0, result.stderr
    assert "state_dict: 1 weight-normalized tensors converted to parametrizations" in result.stdout
    assert ("optimizer: an optimizer's state, kept as it was: the moments it holds for s = log g now stand beside g "
            "itself") in result.stdout


def test_a_torchscript_archive_is_named_as_one(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    result = cli("inspect", str(path))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"wn-transform inspect: error: {path}: a TorchScript archive (torch.jit.save), which "
                                     "holds code, not a checkpoint; load it with torch.jit.load and save its state_dict() "
                                     "with torch.save")


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path: Path, nested: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """(As root, folder permissions do not apply: the check is what os.access says.)"""
    folder = tmp_path / "ro"
    folder.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder else real(p, mode, **kw))
    result = cli("fold", str(nested), "-o", str(folder / "out.pt"))
    assert result.returncode == 1 and f"{folder / 'out.pt'}: cannot write in {folder} (permission denied)" in result.stderr
    with pytest.raises(PermissionError, match=f"cannot write in {re.escape(str(folder))}"):
        wn.export_onnx(torch.nn.Linear(2, 2), torch.randn(1, 2), folder / "m.onnx")
    assert not list(folder.iterdir())


def test_an_existing_external_data_file_is_refused_before_the_export_in_the_clis_words(tmp_path: Path) -> None:
    out = tmp_path / "g.onnx"
    data = tmp_path / "g.onnx.data"
    data.write_bytes(b"earlier weights")
    result = cli("export", "--model", MODEL, "--input-shape", "1,80,12", "-o", str(out))
    assert result.returncode == 1 and f"{data}: already exists; to overwrite it, pass --force" in result.stderr
    assert data.read_bytes() == b"earlier weights" and not out.exists()


def test_model_takes_a_python_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "helpers_for_wn.py").write_text("WIDTH = 6\n")
    (tmp_path / "my_models_for_wn.py").write_text(
        "from torch import nn\nfrom helpers_for_wn import WIDTH\n\n\ndef build():\n    return nn.Linear(4, WIDTH)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    result = cli("apply", "--model", "./my_models_for_wn.py:build", "--preserve", "-o", "out.pt")
    assert result.returncode == 0, result.stderr
    assert set(torch.load(tmp_path / "out.pt")) == {"bias", "parametrizations.weight.original0",
                                                     "parametrizations.weight.original1"}
    missing = cli("apply", "--model", "./nope.py:build", "--preserve", "-o", "out2.pt")
    assert missing.returncode == 1 and "cannot read ./nope.py (from --model ./nope.py:build): no such file" in missing.stderr


@pytest.mark.parametrize("option", ["--checkpoint", "--calib"])
def test_a_missing_input_file_is_named_before_the_model_is_built(tmp_path: Path, option: str) -> None:
    missing = tmp_path / "nope.pt"
    args = ["apply", "--model", "tests.fixtures.no_such_module:build", option, str(missing), "-o", str(tmp_path / "o.pt")]
    if option == "--checkpoint":
        args.insert(-2, "--preserve")
    result = cli(*args)
    assert result.returncode == 1
    assert result.stderr.strip() == f"wn-transform apply: error: {missing}: no such file ({option})"


def test_a_random_batch_follows_a_half_precision_models_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "half_model_for_wn.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef build():\n"
        "    return nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Conv1d(8, 2, 1)).to(torch.bfloat16)\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    result = cli("inspect", "--model", f"{tmp_path / 'half_model_for_wn.py'}:build", "--input-shape", "64,4,16")
    assert result.returncode == 0, result.stderr
    assert "2 weights would be reparameterized" in result.stdout


def test_a_model_file_named_like_an_imported_module_replaces_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    (tmp_path / "random.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Linear(4, 3)\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    result = cli("apply", "--model", f"{tmp_path / 'random.py'}:build", "--preserve", "-o", str(tmp_path / "o.pt"))
    assert result.returncode == 0, result.stderr
    assert sys.modules["random"] is random
    assert set(torch.load(tmp_path / "o.pt")) == {"bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}


def test_a_model_path_without_its_py_suffix_is_a_usage_error(tmp_path: Path) -> None:
    result = cli("inspect", "--model", "./models:build")
    assert result.returncode == 2
    assert "--model must look like package.module:factory or path/to/models.py:factory, got './models:build'" in result.stderr


@pytest.mark.parametrize("factory", ["build_generator", "build_legacy_generator"])
@pytest.mark.parametrize("source", ["plain", "ours"])
def test_a_checkpoint_loads_into_a_model_built_with_weight_norm_on_its_own_axes(factory: str, source: str,
                                                                               tmp_path: Path) -> None:
    """A vocoder class that builds torch's weight norm (either API), given its released plain
    weights or ``apply --preserve``'s output (ConvTranspose normalized per output channel, where
    torch's ``dim=0`` is the input channel): each weight is normalized on the model's own axis
    (``conv_post``: the whole tensor), and the model computes the plain function; a zero unit
    computes 0, not torch's 0/0."""
    import onnxruntime

    plain = build_plain(seed=3)
    with torch.no_grad():
        plain.resblocks[0].convs[0].weight[1].zero_()  # a pruned unit
    state = plain.state_dict() if source == "plain" else wn.apply_weight_norm(plain, init="preserve").state_dict()
    ckpt, out = tmp_path / "ckpt.pt", tmp_path / "g.onnx"
    torch.save(state, ckpt)
    assert main(["export", "--model", f"tests.fixtures.hifigan:{factory}", "--checkpoint", str(ckpt),
                 "--input-shape", "1,80,12", "--exporter", "torchscript", "-o", str(out)]) == 0
    mel = torch.randn(2, 80, 12, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: mel.numpy()})[0]
    with torch.no_grad():
        want = plain(mel).numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_checkpoint_none_of_whose_state_dicts_fits_names_the_closest(tmp_path: Path, capsys) -> None:
    """A discriminators' file (HiFi-GAN's ``do_...``: mpd, msd) given for the generator: no
    ``--key`` would help, and the error says what the closest state dict lacks; two state dicts
    with the model's keys but other shapes do not fit either."""
    source = tmp_path / "do_00000010"
    torch.save({"mpd": {"a.weight": torch.zeros(2, 2)}, "msd": {"b.weight": torch.zeros(2, 2), "b.bias": torch.zeros(2)},
                "steps": 10}, source)
    common = ["inspect", "--model", "tests.test_cli:build_conv", "--checkpoint"]
    assert main([*common, str(source)]) == 1
    err = capsys.readouterr().err
    assert ("none of its 2 state dicts (mpd, msd) fits tests.test_cli:build_conv (the closest, mpd: missing keys "
            "0.bias, 0.weight; unexpected keys a.weight)") in err and "--key" not in err
    other_shapes = tmp_path / "wide.pt"
    wide = {"0.weight": torch.zeros(8, 4, 3), "0.bias": torch.zeros(8)}
    torch.save({"model": wide, "ema": wide}, other_shapes)
    assert main([*common, str(other_shapes)]) == 1
    err = capsys.readouterr().err
    assert "none of its 2 state dicts (model, ema) fits" in err and "other shapes for 0.bias, 0.weight" in err


@pytest.mark.parametrize(("where", "error", "msg"), [
    ("_export_dynamo", AttributeError, "module 'torch._dynamo' has no attribute 'exc'"),  # torch's lazy import
    ("_open_session", ImportError, "initialization failed"),  # onnxruntime's import (pybind), before the check
])
def test_a_stop_that_a_library_swallows_still_stops_the_export(tmp_path: Path, monkeypatch, capsys, where: str,
                                                               error: type, msg: str) -> None:
    """SIGTERM inside the dynamo exporter, where torch's lazy import turns it into an AttributeError
    (its ``except torch._dynamo.exc.UserError`` on a half-imported module), or an import turns it into
    an ImportError: the export does not fall back and write a file; the CLI stops as for any SIGTERM,
    with no traceback."""
    import signal

    from wn_transform import export as export_module

    def swallowing_exporter(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode, in here
            sum(range(10))
        except BaseException as exc:
            raise error(msg) from exc
        raise AssertionError("the signal handler did not run")

    monkeypatch.setattr(export_module, where, swallowing_exporter)
    out = tmp_path / "g.onnx"
    args = ["export", "--model", MODEL, "--input-shape", "1,80,8", "-o", str(out)]
    assert main(args) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM; no output was written" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_stop_after_the_output_is_written_lets_the_command_finish(nested: Path, tmp_path: Path, monkeypatch,
                                                                    capsys) -> None:
    """The output is complete once it is renamed into place: a SIGTERM while the summary prints is
    noted, and the command exits 0 (not "no output was written" beside a complete file)."""
    import builtins
    import signal

    out = tmp_path / "out.pt"
    sent = []

    def print_then_killed(*args, **kwargs) -> None:
        builtins.print(*args, **kwargs)
        if not sent and kwargs.get("file") is not sys.stderr:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr("wn_transform.cli.print", print_then_killed, raising=False)
    assert main(["fold", str(nested), "-o", str(out)]) == 0
    assert sent and "SIGTERM arrived after" in capsys.readouterr().err
    assert wn.find_state_dict_weight_norms(torch.load(out, weights_only=True)["generator"]) == []


def test_a_stop_while_the_interpreter_cleans_up_after_the_output_is_written_exits_0(nested: Path,
                                                                                       tmp_path: Path) -> None:
    """The command line's process takes about a second to clean up after a large export: a SIGTERM
    then (sent here from an exit handler) leaves the exit code 0, since the output is complete; a
    run that wrote nothing keeps the signal's status."""
    script = ("import atexit, os, signal, time\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.2)))\n"
              "from wn_transform.cli import console_script\n"
              "console_script()\n")
    out = tmp_path / "out.pt"
    done = subprocess.run([sys.executable, "-c", script, "fold", str(nested), "-o", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and out.exists(), done.stderr
    failed = subprocess.run([sys.executable, "-c", script, "fold", str(tmp_path / "absent.pt"), "-o",
                             str(tmp_path / "none.pt")], capture_output=True, text=True, timeout=120)
    assert failed.returncode == -15 and "no such file" in failed.stderr


def test_a_closed_pipe_on_stdout_ends_inspect_quietly(nested: Path, monkeypatch, capsys) -> None:
    """``wn-transform inspect big.pt | head -1``: the reader closed the pipe; no error message, the
    exit code a shell gives a process stopped by SIGPIPE."""
    def closed_pipe(*args, **kwargs) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("wn_transform.cli.print", closed_pipe, raising=False)
    assert main(["inspect", str(nested)]) == 141
    assert "error" not in capsys.readouterr().err


def test_a_folder_given_as_the_checkpoint_names_the_files_in_it(tmp_path: Path, capsys) -> None:
    """A ``save_pretrained`` folder: the error names its index (a sharded checkpoint), or its files;
    DeepSpeed's folder, the files one folder down, those its ``latest`` names first."""
    sharded, single, empty, deepspeed = tmp_path / "sharded", tmp_path / "single", tmp_path / "empty", tmp_path / "ds"
    for folder in (sharded, single, empty, deepspeed / "global_step100", deepspeed / "global_step200"):
        folder.mkdir(parents=True)
    for step in (100, 200):
        torch.save({"module": {"w": torch.ones(2)}}, deepspeed / f"global_step{step}" / "mp_rank_00_model_states.pt")
    (deepspeed / "latest").write_text("global_step200")
    save_file({"w": torch.ones(2)}, sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    save_file({"w": torch.ones(2)}, single / "model.safetensors")
    torch.save({"state": {}}, single / "optimizer.pt")  # a trainer's state beside the weights: not offered
    (single / "config.json").write_text("{}")
    for folder, said in ((sharded, "pass the checkpoint file in it: model.safetensors.index.json (a sharded "
                                   "checkpoint's index, read whole)"),
                         (single, "pass the checkpoint file in it: model.safetensors"),
                         (deepspeed, "pass a checkpoint file in a folder in it: global_step200/mp_rank_00_model_states.pt, "
                                     "global_step100/mp_rank_00_model_states.pt"),
                         (empty, "it holds no checkpoint file")):
        assert main(["fold", str(folder), "-o", str(tmp_path / "out.pt")]) == 1
        assert f"error: {folder}: is a folder; {said}" in capsys.readouterr().err


def _inner_autoencoder() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.utils.weight_norm(torch.nn.Conv1d(1, 4, 7, padding=3)), torch.nn.ELU(),
                               torch.nn.utils.weight_norm(torch.nn.Conv1d(4, 1, 7, padding=3)))


class _Wrapper(torch.nn.Module):
    """A user's wrapper around a library's model (moshi's SEANet, diffusers' Oobleck): its keys are
    the inner model's under ``ae.``."""

    def __init__(self) -> None:
        super().__init__()
        self.ae = _inner_autoencoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae(x)


def build_wrapper() -> torch.nn.Module:
    return _Wrapper()


def test_a_checkpoint_of_the_inner_module_names_both_sides_alike_and_the_prefix(tmp_path: Path, capsys) -> None:
    """The inner model's checkpoint given for the wrapper: the missing pairs are named by their
    weight, as the checkpoint's are (not ``weight_g``/``weight_v`` beside ``weight``), and the
    error says the keys fit under ``ae.``."""
    ckpt = tmp_path / "inner.pt"
    with pytest.warns(FutureWarning):  # torch's legacy weight_norm
        torch.save(_inner_autoencoder().state_dict(), ckpt)
    assert main(["export", "--model", "tests.test_cli:build_wrapper", "--checkpoint", str(ckpt), "--input-shape",
                 "1,1,32", "-o", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert ("missing keys ae.0.bias, ae.0.weight, ae.2.bias, ae.2.weight; unexpected keys 0.bias, 0.weight, 2.bias, "
            "2.weight (they fit it under 'ae.': the checkpoint holds the state dict of the model's 'ae' module alone") in err
    assert not (tmp_path / "m.onnx").exists()


def build_normalized_pair() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(3, 4, 3)), torch.nn.ReLU(),
                               torch.nn.Conv1d(4, 2, 1))


def test_a_plain_weight_of_another_shape_for_a_pair_is_named_once(tmp_path: Path, capsys) -> None:
    """The checkpoint's ``0.weight`` (another shape) for the model's pair: named as of another shape,
    not also as missing and unexpected."""
    ckpt = tmp_path / "other.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv1d(3, 5, 3), torch.nn.ReLU(), torch.nn.Conv1d(4, 2, 1)).state_dict(), ckpt)
    assert main(["apply", "--model", "tests.test_cli:build_normalized_pair", "--checkpoint", str(ckpt), "--preserve",
                 "-o", str(tmp_path / "out.pt")]) == 1
    err = capsys.readouterr().err
    assert "0.weight" in err and "missing keys 0.weight" not in err and "unexpected keys 0.weight" not in err, err


def build_lazy() -> torch.nn.Module:
    """A model whose first layer is lazy until its first call."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.LazyLinear(4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def test_a_lazy_model_loads_its_checkpoint(tmp_path: Path, capsys) -> None:
    """A lazy layer has no shape until load_state_dict materializes it: any shape fits."""
    trained = build_lazy()
    trained(torch.randn(2, 3))
    ckpt = tmp_path / "lazy.pt"
    torch.save(trained.state_dict(), ckpt)
    assert main(["apply", "--model", "tests.test_cli:build_lazy", "--checkpoint", str(ckpt), "--preserve",
                 "-o", str(tmp_path / "wn.pt")]) == 0
    folded = wn.fold_state_dict(torch.load(tmp_path / "wn.pt", weights_only=True))
    torch.testing.assert_close(folded["0.weight"], trained[0].weight)


def test_a_stop_between_the_rename_and_the_writers_return_says_the_output_is_complete(
        nested: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """A signal that lands after the output was renamed into place, before the command hears of it:
    the run reports the output complete and exits 0."""
    import signal

    from wn_transform import cli

    real_save = cli.save_checkpoint

    def saved_then_killed(*args, **kwargs) -> None:
        real_save(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10))

    monkeypatch.setattr(cli, "save_checkpoint", saved_then_killed)
    out = tmp_path / "out.pt"
    assert main(["fold", str(nested), "-o", str(out)]) == 0
    assert f"SIGTERM arrived after {out} was written in full; it is complete" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "out.pt"]


def test_no_fitting_state_dict_with_one_unreadable_pair_still_names_the_closest(tmp_path: Path, capsys) -> None:
    """A state dict whose weight-norm pair cannot take the model's layout is ranked out, not raised."""
    source = tmp_path / "two.pt"
    torch.save({"model": {"0.weight": torch.zeros(8, 4, 3), "0.bias": torch.zeros(8)},
                "disc": {"x.weight_g": torch.ones(3), "x.weight_v": torch.ones(4, 5, 6)}}, source)
    assert main(["inspect", "--model", "tests.test_cli:build_conv", "--checkpoint", str(source)]) == 1
    assert "none of its 2 state dicts (model, disc) fits tests.test_cli:build_conv (the closest, model: other shapes " \
           "for 0.bias, 0.weight)" in capsys.readouterr().err


def build_exp_scale_generator() -> torch.nn.Module:
    """The generator weight-normalized by this library with ``g = e^s`` (a marker in its state dict)."""
    return wn.apply_weight_norm(build_plain(seed=0), init="preserve", exp_scale=True)


def test_a_plain_checkpoint_loads_into_an_exp_scale_model(tmp_path: Path) -> None:
    """The pairs made from the plain weights hold ``g`` and no ``g_is_log`` marker: the layer's load
    stores ``s = log g`` (and the model computes the plain function, a pruned unit included)."""
    plain = build_plain(seed=3)
    with torch.no_grad():
        plain.conv_pre.weight[2].zero_()
    ckpt, out = tmp_path / "plain.pt", tmp_path / "wn.pt"
    torch.save(plain.state_dict(), ckpt)
    assert main(["apply", "--model", "tests.test_cli:build_exp_scale_generator", "--checkpoint", str(ckpt),
                 "--preserve", "-o", str(out)]) == 0
    model = build_exp_scale_generator()
    model.load_state_dict(torch.load(out, weights_only=True))
    mel = torch.randn(2, 80, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(mel), plain(mel), rtol=1e-5, atol=1e-6)


def test_a_bfloat16_checkpoint_into_a_float32_model_built_with_weight_norm_keeps_the_function(tmp_path: Path) -> None:
    """g is the norm of the bfloat16 weight taken in float32, not rounded to bfloat16: the float32
    model computes the checkpoint's weights to float32 rounding."""
    plain = build_plain(seed=3)
    state = {k: v.to(torch.bfloat16) for k, v in plain.state_dict().items()}
    ckpt, out = tmp_path / "bf16.pt", tmp_path / "wn.pt"
    torch.save(state, ckpt)
    assert main(["apply", "--model", "tests.fixtures.hifigan:build_generator", "--checkpoint", str(ckpt),
                 "--preserve", "-o", str(out)]) == 0
    model = build_generator()
    model.load_state_dict(torch.load(out, weights_only=True))
    plain.load_state_dict({k: v.float() for k, v in state.items()})
    mel = torch.randn(2, 80, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(mel), plain(mel), rtol=1e-5, atol=1e-6)


def test_apply_piped_into_a_reader_that_closes_writes_its_output_first(tmp_path: Path, monkeypatch, capsys) -> None:
    """``wn-transform apply ... | head``: the checkpoint is written before the report is printed."""
    def closed_pipe(*args, **kwargs) -> None:
        if kwargs.get("file") is not sys.stderr:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("wn_transform.cli.print", closed_pipe, raising=False)
    out = tmp_path / "wn.pt"
    assert main(["apply", "--model", "tests.test_cli:build_conv", "--preserve", "-o", str(out)]) == 0
    assert wn.find_state_dict_weight_norms(torch.load(out, weights_only=True))


def test_every_stop_signal_raises_until_the_output_is_written() -> None:
    """A library that swallows the first stop does not make the next one harmless: each raises (as
    Python's Ctrl-C does) until the output is in place; after that a signal is only noted."""
    import signal

    from wn_transform import cli

    progress = cli._Progress(0.0)
    with cli._stopped_by_signals(progress):
        with contextlib.suppress(cli._Stopped):  # a library that catches everything
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(10))
        with pytest.raises(cli._Stopped):
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(10))
        progress.wrote("out.pt")
        os.kill(os.getpid(), signal.SIGTERM)  # noted, not raised
        sum(range(10))
    assert progress.received == signal.SIGTERM and progress.output_written()


def _legacy_conv_state(prefix: str = "") -> dict[str, torch.Tensor]:
    layer = torch.nn.utils.weight_norm(torch.nn.Conv1d(3, 4, 5))
    return {f"{prefix}{key}": value.detach().clone() for key, value in layer.state_dict().items()}


def test_a_prefix_in_two_state_dicts_is_chosen_with_path_and_prefix(tmp_path: Path) -> None:
    """Lightning's weight averaging keeps ``model.`` keys in ``state_dict`` and ``current_model_state``:
    ``--key model`` names both, ``--key state_dict.model`` takes one."""
    state = _legacy_conv_state("model.")
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "state_dict": state, "current_model_state": {k: v * 2 for k, v in state.items()}}, path)
    result = cli("fold", str(path), "--key", "model", "-o", str(tmp_path / "a.pt"))
    assert result.returncode == 1
    assert ("keys under 'model.' are in 2 state dicts (state_dict, current_model_state): choose one with --key "
            "state_dict.model or --key current_model_state.model") in result.stderr
    assert not (tmp_path / "a.pt").exists()
    assert cli("fold", str(path), "--key", "current_model_state.model", "-o", str(tmp_path / "b.pt")).returncode == 0
    expected = wn.fold_state_dict({k.removeprefix("model."): v * 2 for k, v in state.items()})
    folded = torch.load(tmp_path / "b.pt")
    assert folded.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(folded[key], expected[key])


def test_an_error_in_one_of_several_state_dicts_names_it(tmp_path: Path) -> None:
    ema = _legacy_conv_state()
    ema["weight"] = ema["weight_v"].clone()  # a plain weight beside its pair
    path = tmp_path / "ckpt.pt"
    torch.save({"model": _legacy_conv_state(), "ema": ema}, path)
    result = cli("fold", str(path), "-o", str(tmp_path / "out.pt"))
    assert result.returncode == 1
    assert (f"{path} (state dict ema): weight_g: this state dict holds both a plain weight and its weight-norm pair "
            "(weight_g, weight_v)") in result.stderr


def test_a_torch_save_archive_named_safetensors_is_read_by_its_content(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    torch.save(_legacy_conv_state(), path)
    assert checkpoint.file_format(path) == "zip"
    assert cli("fold", str(path), "-o", str(tmp_path / "out.pt")).returncode == 0
    assert set(torch.load(tmp_path / "out.pt")) == {"weight", "bias"}


def test_a_checkpoint_whose_config_holds_itself_folds(tmp_path: Path) -> None:
    config: dict = {"lr": 0.1}
    config["parent"] = config  # pickle keeps the cycle; weights_only loads it
    path = tmp_path / "ckpt.pt"
    torch.save({"model": _legacy_conv_state(), "config": config}, path)
    assert cli("inspect", str(path)).returncode == 0
    assert cli("fold", str(path), "-o", str(tmp_path / "out.pt")).returncode == 0
    folded = torch.load(tmp_path / "out.pt")
    assert set(folded["model"]) == {"weight", "bias"} and folded["config"]["parent"] is folded["config"]


def test_tensors_safetensors_cannot_store_are_named_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({**_legacy_conv_state(), "codes": torch.ones(3, 3).to_sparse()}, path)
    result = cli("fold", str(path), "-o", str(tmp_path / "out.safetensors"))
    assert result.returncode == 1
    assert "codes is a sparse_coo tensor, which safetensors cannot store (it holds dense tensors); use .pt" in result.stderr
    assert list(tmp_path.iterdir()) == [path]


def test_a_tar_archive_is_named_with_what_to_extract(tmp_path: Path) -> None:
    import tarfile

    inner = tmp_path / "model_weights.ckpt"
    torch.save(_legacy_conv_state(), inner)
    with tarfile.open(tmp_path / "model.nemo", "w") as archive:
        archive.add(inner, arcname="model_weights.ckpt")
    result = cli("inspect", str(tmp_path / "model.nemo"))
    assert result.returncode == 1
    assert "a tar archive (NeMo's .nemo is one), not a checkpoint; extract it" in result.stderr


def test_apply_keeps_the_input_safetensors_metadata(tmp_path: Path) -> None:
    source = tmp_path / "plain.safetensors"
    save_file(build_plain().state_dict(), source, metadata={"format": "pt", "origin": "test"})
    out = tmp_path / "wn.safetensors"
    assert cli("apply", "--model", MODEL, "--checkpoint", str(source), "--preserve", "-o", str(out)).returncode == 0
    with safe_open(str(out), framework="pt") as file:
        assert file.metadata() == {"format": "pt", "origin": "test"}


def test_apply_names_the_path_and_prefix_that_fit_among_several_state_dicts(tmp_path: Path) -> None:
    state = {f"model.{key}": value for key, value in build_plain().state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "current_model_state": dict(state)}, path)
    result = cli("apply", "--model", MODEL, "--checkpoint", str(path), "--preserve", "-o", str(tmp_path / "out.pt"))
    assert result.returncode == 1
    assert "(the keys under 'model.' fit it: choose them with --key state_dict.model)" in result.stderr
    assert cli("apply", "--model", MODEL, "--checkpoint", str(path), "--key", "state_dict.model", "--preserve",
               "-o", str(tmp_path / "out.pt")).returncode == 0


@pytest.mark.parametrize("name", ["best.th", "weights.pkl", "model_best.pth.tar", "plain"])
def test_an_output_with_another_checkpoint_suffix_is_written_with_torch_save(nested: Path, tmp_path: Path, name: str) -> None:
    assert cli("fold", str(nested), "-o", str(tmp_path / name)).returncode == 0
    assert set(torch.load(tmp_path / name)) == {"generator", "discriminator", "step"}


def test_a_safetensors_header_whose_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path: Path) -> None:
    """safetensors' header length is 8-byte little-endian: its first byte is 0x80 (a pickle's first
    byte) for 1 in 32 header lengths; the layout is tested before the magic bytes."""
    path = tmp_path / "model.safetensors"
    for padding in range(400):
        save_file({"fc.weight": torch.ones(3, 4)}, path, metadata={"pad": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert checkpoint.file_format(path) == "safetensors"
    assert list(checkpoint.load_checkpoint(path)) == ["fc.weight"]


def test_a_zero_filled_file_is_not_called_a_tar_archive(tmp_path: Path) -> None:
    path = tmp_path / "truncated.pt"
    path.write_bytes(b"\0" * 1024)  # a preallocated download that never came
    result = cli("inspect", str(path))
    assert result.returncode == 1 and "not a PyTorch checkpoint" in result.stderr and "tar archive" not in result.stderr
