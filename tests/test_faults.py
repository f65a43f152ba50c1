"""Faults at run time are the user's environment, not sdelang's bugs: each is provoked here and must give
one plain message and exit status 2 (never "internal error", exit 3), with nothing partial left behind;
and a run killed at any step resumes to the same records, bit for bit."""
from __future__ import annotations

import errno
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from sdelang.cli import main
from sdelang.runtime import training
from sdelang.runtime.config import ModelConfig, TrainConfig
from sdelang.runtime.training import CHECKPOINT, PREVIOUS, train

ROOT = Path(__file__).resolve().parents[1]
VP = ROOT / "examples" / "vp_likelihood.sde"
TINY = ["--steps", "20", "--batch", "64", "--width", "16", "--depth", "1", "--quiet", "--threads", "1",
        "--checkpoint-every", "10", "--plot-samples", "0"]


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of `sdelang ARGV` in this process."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    return status, out, err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "moons"
    assert main(["train", str(VP), "--data", "moons", "--out", str(out), *TINY]) == 0
    return out


# --- resume exactness -----------------------------------------------------------------------------

def _config(**changes) -> TrainConfig:
    base = TrainConfig(sde_source=VP.read_text(encoding="utf-8"), sde_name=VP.name, data="moons", steps=30,
                       batch=32, log_every=5, checkpoint_every=7, eval_every=10, warmup=5, plot_samples=0,
                       model=ModelConfig(width=16, depth=1, embedding=8))
    return replace(base, **changes)


def _records(out: Path) -> dict:
    return {name: (out / name).read_bytes() for name in ("loss.csv", "eval.csv")}


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", [16, 23])
def test_a_run_killed_between_checkpoints_resumes_to_identical_records(tmp_path, monkeypatch, kill_at):
    """checkpoint_every = 7 divides neither log_every = 5 nor eval_every = 10: the checkpoints at 14 and 21
    fall inside a logging interval, so the partial loss sum, the evaluation records and the generators must
    all come back from the checkpoint for loss.csv, eval.csv and the final checkpoint to match."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(), straight, progress=False)

    update = training._ema_update

    def dies(ema, model, decay, step):   # `step` counts from 0: the kill is in the (kill_at)-th step
        if step + 1 == kill_at:
            raise Killed
        update(ema, model, decay, step)

    monkeypatch.setattr(training, "_ema_update", dies)
    with pytest.raises(Killed):
        train(_config(), resumed, progress=False)
    monkeypatch.setattr(training, "_ema_update", update)
    assert torch.load(resumed / CHECKPOINT, weights_only=True)["step"] == (kill_at - 1) // 7 * 7
    train(_config(), resumed, progress=False)

    assert _records(resumed) == _records(straight)
    a, b = (torch.load(out / CHECKPOINT, weights_only=True) for out in (straight, resumed))
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert all(torch.equal(x, y) for x, y in zip(a[key].values(), b[key].values())
                       if isinstance(x, torch.Tensor)), key
        elif key == "generators":
            assert all(torch.equal(x, y) for pa, pb in zip(a[key], b[key]) for x, y in zip(pa, pb))
        elif key != "optimizer":
            assert a[key] == b[key], key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert all(torch.equal(a["optimizer"]["state"][i][k], b["optimizer"]["state"][i][k])
               for i in a["optimizer"]["state"] for k in a["optimizer"]["state"][i])


def test_resuming_says_from_which_step(tmp_path, capsys):
    train(_config(steps=7, eval_every=0), tmp_path, progress=False)
    train(_config(steps=9, eval_every=0), tmp_path, progress=True)
    assert f"resuming {tmp_path} from step 7 of 9" in capsys.readouterr().err


# --- damaged checkpoints --------------------------------------------------------------------------

DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: os.urandom(4096),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["sample", "nll", "train"])
def test_a_damaged_checkpoint_is_named_with_the_previous_good_one(run, tmp_path, capsys, damage, command):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    path = copy / CHECKPOINT
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    argv = {"sample": ["sample", copy, "-n", "10", "--steps", "2", "--quiet"],
            "nll": ["nll", copy, "-n", "4", "--quiet"],
            "train": ["train", VP, "--data", "moons", "--out", copy, *TINY[:-4], "--steps", "30"]}[command]
    status, _, err = run_cli(argv, capsys)
    assert status == 2
    assert f"{path} is damaged (" in err
    assert f"the previous good checkpoint is {copy / PREVIOUS} (step 10)" in err


def test_without_a_previous_checkpoint_the_advice_is_a_new_run(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / PREVIOUS).unlink()
    (copy / CHECKPOINT).write_bytes(b"")
    status, _, err = run_cli(["sample", copy, "-n", "10", "--steps", "2"], capsys)
    assert status == 2 and "is damaged" in err and "start again with a new --out" in err


def test_a_damaged_run_json_is_reported(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "run.json").write_text("{ half", encoding="utf-8")
    status, _, err = run_cli(["sample", copy, "-n", "10"], capsys)
    assert status == 2 and f"{copy / 'run.json'} is damaged" in err


# --- files that cannot be written -----------------------------------------------------------------

def test_compile_into_a_path_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "generated"
    blocker.write_text("not a folder")
    status, _, err = run_cli(["compile", ROOT / "examples" / "vp.sde", "-o", blocker], capsys)
    assert status == 2
    assert f"cannot write {blocker / 'vp.py'}: {blocker} is a file, not a folder" in err
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "no space left on device"),
                                          (errno.EACCES, "permission denied"),
                                          (errno.EROFS, "read-only file system")])
def test_compile_when_the_disk_refuses(tmp_path, capsys, monkeypatch, code, reason):
    """The disk fills (or refuses) while the module is written: one line naming the target, nothing left."""
    real_replace = os.replace

    def refuses(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", refuses)
    status, _, err = run_cli(["compile", ROOT / "examples" / "vp.sde", "-o", tmp_path], capsys)
    monkeypatch.setattr(os, "replace", real_replace)
    assert status == 2
    assert f"cannot write {tmp_path / 'vp.py'}: {reason}" in err.lower()
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_training_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", str(VP), "--data", "moons", "--out", str(out), *TINY]) == 0
    before = (out / CHECKPOINT).read_bytes()

    def full(obj, f, *args, **kwargs):
        f.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    status, _, err = run_cli(["train", VP, "--data", "moons", "--out", out, *TINY[:-4], "--steps", "30",
                              "--checkpoint-every", "10", "--plot-samples", "0"], capsys)
    assert status == 2 and f"cannot write {out / CHECKPOINT}: no space left on device" in err.lower()
    assert (out / CHECKPOINT).read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# --- devices, step counts, data -------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
@pytest.mark.parametrize("command", ["train", "sample"])
def test_cuda_on_a_machine_without_it(run, tmp_path, capsys, command):
    argv = {"train": ["train", VP, "--out", tmp_path / "x", "--device", "cuda", *TINY],
            "sample": ["sample", run, "--device", "cuda", "-n", "4"]}[command]
    status, _, err = run_cli(argv, capsys)
    assert status == 2 and "no CUDA device here (asked for 'cuda'); use --device cpu" in err


def test_a_step_count_too_large_is_refused_before_any_work(run, capsys):
    status, _, err = run_cli(["sample", run, "--steps", str(10**12), "-n", "4"], capsys)
    assert status == 2 and "--steps must be between 1 and 1,000,000, got 1,000,000,000,000" in err


def test_steps_with_the_adaptive_ode_solver_is_refused(run, capsys):
    status, _, err = run_cli(["sample", run, "--method", "ode", "--steps", "10", "-n", "4"], capsys)
    assert status == 2 and "--steps does not apply to 'ode'" in err


def test_a_truncated_image_is_named(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / f"{i}.png")
    data = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(data[: len(data) * 2 // 3])   # a copy cut short inside the pixel data
    status, _, err = run_cli(["train", VP, "--data", folder, "--out", tmp_path / "run", *TINY], capsys)
    assert status == 2 and f"{str(folder / '1.png')!r} is damaged (" in err and "replace or remove it" in err


def test_a_missing_optional_package_is_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)   # as if scikit-learn were not installed
    status, _, err = run_cli(["train", VP, "--data", "digits", "--out", tmp_path / "run", *TINY], capsys)
    assert status == 2
    assert "the 'digits' data set needs the scikit-learn package" in err and "pip install 'sdelang[data]'" in err


def test_a_latin1_file_is_located(tmp_path, capsys):
    path = tmp_path / "cafe.sde"
    path.write_bytes("sde cafe\n# caf\u00e9 au lait\ndx = dw\n".encode("latin-1"))
    status, _, err = run_cli(["compile", path, "-o", tmp_path], capsys)
    assert status == 2
    lines = err.splitlines()
    assert lines[0] == f"{path}:2:6: error: byte 0xe9 is not UTF-8: .sde files are read as UTF-8"
    assert lines[2] == "         ^" and "iconv -f latin1 -t utf-8" in err


# --- progress, portability, help -----------------------------------------------------------------

def test_sample_and_nll_show_progress(run, capsys):
    assert main(["sample", str(run), "--method", "em", "--steps", "5", "-n", "10"]) == 0
    assert "em:" in capsys.readouterr().err
    assert main(["nll", str(run), "-n", "4", "--tol", "1e-3"]) == 0
    assert "nll:" in capsys.readouterr().err
    assert main(["sample", str(run), "--method", "em", "--steps", "5", "-n", "10", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_a_moved_run_samples_from_another_folder_without_its_data(tmp_path, capsys, monkeypatch):
    data = tmp_path / "ring.npy"
    angle = np.random.default_rng(0).uniform(0, 2 * np.pi, 2000)
    np.save(data, np.stack([np.cos(angle), np.sin(angle)], 1).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(VP), "--data", "ring.npy", "--out", "run", *TINY]) == 0
    capsys.readouterr()
    shutil.move(tmp_path / "run", tmp_path / "moved")
    data.unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    status, out, err = run_cli(["sample", tmp_path / "moved", "--method", "em", "--steps", "5", "-n", "10",
                                "--json"], capsys)
    assert status == 0 and '"method": "em"' in out and '"finite": true' in out
    assert "no two-sample test" in err and "ring.npy" in err


def test_help_states_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default 256)", "(default 0.002)", "(default 0.999)", "(default 0)", "(default 500)",
                    "(default 1000)", "(default pc)", "(default cpu)", "(default float32)"):
        assert default in text, default
    with pytest.raises(SystemExit):
        main(["nll", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default 256)" in text and "(default 1)" in text and "upper bound on the NLL of the SDE model" in text


def test_the_adaptive_ode_sampler_counts_its_evaluations_on_a_bar(run, capsys):
    assert main(["sample", str(run), "--method", "ode", "-n", "10", "--json"]) == 0
    captured = capsys.readouterr()
    assert "ode:" in captured.err and "NFE" in captured.err and '"method": "ode"' in captured.out
