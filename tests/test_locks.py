"""One writer per output folder: every command that writes a folder holds its lock, a second writer is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from convlens.activations.store import store_from_tensors
from convlens.cli import cli
from convlens.data.shapes import write_shapes
from convlens.runtime import locks
from convlens.runtime.locks import LOCK_FILE, OutputLockedError, output_lock

TINY = ["--model", "tiny-cnn", "--model-input-size", "32", "--model-width", "4"]
HOLDER = textwrap.dedent(
    """
    import sys, time
    from convlens.runtime.locks import output_lock

    with output_lock(sys.argv[1], command="train-model tiny-cnn --lr 0.003"):
        print("locked", flush=True)
        if sys.argv[2] == "die":
            import os, signal
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    """
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("locks")
    write_shapes(root / "shapes", n=8, size=32, seed=0)
    vectors = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    store_from_tensors(root / "store", vectors, split=(torch.arange(400) % 5 == 0).to(torch.uint8))
    (root / "sweep.json").write_text(json.dumps([{"sae": "relu-l1", "params": {"latent_dim": 8}}]))
    (root / "run").mkdir()
    (root / "run" / "pipeline.json").write_text(json.dumps({"title": "locks"}))
    return {
        "shapes": root / "shapes",
        "image": next((root / "shapes").rglob("*.png")),
        "store": root / "store",
        "sweep": root / "sweep.json",
        "run": root / "run",
    }


WRITERS = {
    "data shapes": lambda i: ["data", "shapes", "--n", "4", "--size", "16"],
    "train-model": lambda i: [
        "train-model", "tiny-cnn", "--data", i["shapes"], "--input-size", "32", "--width", "4", "--epochs", "1",
    ],
    "extract": lambda i: ["extract", *TINY, "--data", i["shapes"], "--device", "cpu"],
    "compare-filters": lambda i: ["compare-filters", *TINY, "--data", i["shapes"], "--filters", "magnitude,uniform"],
    "train-sae": lambda i: ["train-sae", "--store", i["store"], "--sae", "l1", "--latent-dim", "8", "--steps", "2"],
    "sweep": lambda i: ["sweep", "--store", i["store"], "--config", i["sweep"], "--steps", "2"],
    "visualize": lambda i: ["visualize", "activation-maps", *TINY, "--units", "0", "--data", i["image"]],
    "sanity-check": lambda i: ["sanity-check", "gradcam", *TINY, "--data", i["shapes"], "--max-images", "2"],
    "circuit": lambda i: ["circuit", *TINY, "--units", "0", "--data", i["shapes"]],
    "rank-units": lambda i: ["rank-units", *TINY, "--image", i["image"]],
    "report": lambda i: ["report", i["run"]],
    "demo": lambda i: ["demo"],
}  # fmt: skip


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


def start_holder(folder: Path, then: str = "sleep") -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), then], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline() == "locked\n", holder.stderr
    return holder


@pytest.mark.parametrize("command", list(WRITERS))
def test_every_writing_command_is_refused_while_another_writer_holds_its_folder(inputs, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / ("pipeline.json" if command == "demo" else "earlier-result.json")).write_text('{"kept": true}\n')
    with output_lock(out, command="holder"):
        before = contents(out)
        result = invoke(*WRITERS[command](inputs), "--out", out)
        assert contents(out) == before
    assert result.exit_code == 1, result.output
    assert f"Error: {out} is in use: 'holder' (pid {os.getpid()} on " in result.output
    assert "Traceback" not in result.output
    assert sorted(contents(out)) == ["earlier-result.json" if command != "demo" else "pipeline.json"]


def test_a_second_train_model_while_a_live_process_holds_the_folder_is_refused(inputs, tmp_path):
    out = tmp_path / "train"
    out.mkdir()
    (out / "config.json").write_text('{"lr": 0.003}\n')
    holder = start_holder(out)
    try:
        before = contents(out)
        result = invoke(*WRITERS["train-model"](inputs), "--lr", "0.01", "--out", out)
        assert contents(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith(f"Error: {out} is in use: 'train-model tiny-cnn --lr 0.003' (pid {holder.pid} on ")
    assert ", since 20" in message and message.endswith("wait for it to finish or choose another --out")


def test_two_train_sae_runs_started_together_into_one_folder_one_wins_the_other_is_refused(inputs, tmp_path):
    out = tmp_path / "sae"
    runs = {
        lr: subprocess.Popen(
            [
                sys.executable, "-m", "convlens", "train-sae", "--store", str(inputs["store"]), "--sae", "relu-l1",
                "--latent-dim", "8", "--steps", "300", "--lr", lr, "--device", "cpu", "--out", str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for lr in ("0.003", "0.01")
    }  # fmt: skip
    finished = {lr: (run.wait(timeout=120), run.communicate()[1]) for lr, run in runs.items()}
    assert sorted(code for code, _ in finished.values()) == [0, 1], finished
    winner = next(lr for lr, (code, _) in finished.items() if code == 0)
    refused = next(stderr for code, stderr in finished.values() if code == 1)
    assert f"Error: {out} is in use: 'train-sae' (pid " in refused
    assert "Traceback" not in refused
    assert json.loads((out / "config.json").read_text())["training"]["lr"] == float(winner)
    assert not (out / LOCK_FILE).exists()


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_message(tmp_path):
    out = tmp_path / "shapes"
    holder = start_holder(out, then="die")
    holder.wait()
    assert holder.returncode == -signal.SIGKILL and (out / LOCK_FILE).is_file()
    result = CliRunner().invoke(cli, ["data", "shapes", "--out", str(out), "--n", "4", "--size", "16"])
    assert result.exit_code == 0, result.output
    assert (
        f"warning: taking over the stale lock of {out}: 'train-model tiny-cnn --lr 0.003' (pid {holder.pid} on "
        in result.stderr
    )
    assert "is no longer running" in result.stderr
    assert (out / "concepts.json").is_file() and not (out / LOCK_FILE).exists()


def test_without_flock_the_holder_pid_decides_whether_a_lock_is_stale(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "_try_lock", lambda handle: None)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for pid, stale in ((int(gone.stdout), True), (os.getppid(), False)):
        record = {"pid": pid, "host": locks.socket.gethostname(), "command": "extract", "started": "earlier"}
        (tmp_path / LOCK_FILE).write_text(json.dumps(record))
        said: list[str] = []
        if stale:
            with output_lock(tmp_path, command="extract", announce=said.append):
                assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
            assert said == [f"warning: taking over the stale lock of {tmp_path}: 'extract' (pid {pid} on "
                            f"{record['host']}, since earlier) is no longer running"]  # fmt: skip
        else:
            with pytest.raises(OutputLockedError, match=f"'extract' \\(pid {pid} on "):
                with output_lock(tmp_path, command="extract", announce=said.append):
                    pass
            assert json.loads((tmp_path / LOCK_FILE).read_text()) == record and said == []


def test_a_lock_from_another_host_is_not_taken_over_and_the_message_says_how_to_clear_it(tmp_path):
    record = {"pid": 1, "host": "elsewhere", "command": "run demo.toml", "started": "2025-01-01T00:00:00+00:00"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(OutputLockedError) as refused:
        with output_lock(tmp_path, command="report"):
            pass
    assert str(refused.value) == (
        f"{tmp_path} is in use: 'run demo.toml' (pid 1 on elsewhere, since 2025-01-01T00:00:00+00:00) is writing "
        f"into it; wait for it to finish or choose another --out; if no such process is running, delete "
        f"{tmp_path / LOCK_FILE}"
    )
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == record


def test_the_lock_file_is_gone_after_a_success_a_failure_and_an_interrupt(tmp_path):
    done = invoke("data", "shapes", "--out", tmp_path / "new", "--n", "4", "--size", "16")
    assert done.exit_code == 0, done.output
    assert not (tmp_path / "new" / LOCK_FILE).exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine\n")
    failed = invoke("data", "shapes", "--out", other, "--n", "4", "--size", "16")
    assert failed.exit_code == 1 and f"Error: {other} exists and is not a shapes dataset" in failed.output
    assert contents(other) == {"notes.txt": b"mine\n"}

    with pytest.raises(KeyboardInterrupt):
        with output_lock(tmp_path / "interrupted", command="extract"):
            assert (tmp_path / "interrupted" / LOCK_FILE).is_file()
            raise KeyboardInterrupt
    assert list((tmp_path / "interrupted").iterdir()) == []


def test_a_folder_inside_one_another_process_writes_is_refused_and_inside_ones_own_is_not(tmp_path):
    run = tmp_path / "run"
    holder = start_holder(run)
    try:
        result = invoke("data", "shapes", "--out", run / "data", "--n", "4", "--size", "16")
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1
    assert f"Error: {run / 'data'} is inside {run}, which 'train-model tiny-cnn --lr 0.003' (pid {holder.pid}" in (
        result.output
    )
    assert not (run / "data").exists()
    with output_lock(run, command="run"), output_lock(run / "report", command="report"):
        assert (run / "report" / LOCK_FILE).is_file()
    assert contents(run) == {}
