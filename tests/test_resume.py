"""Reproducible and resumable training through the bundle CLI (issue 9: resume, determinism).

A short MSVM-UNet run on a tiny synthetic ACDC set (3 epochs, 4 iterations each, validation every
epoch) is the reference. A run killed in the middle of epoch 2 (SIGKILL, or SIGTERM) and restarted
with ``resume=True`` must end with exactly the reference's final weights, optimizer and scheduler
state, having trained only epochs 2 and 3 the second time: the same seed gives bit-identical weights
(CPU) across processes, and resuming loses nothing.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time

import bundle_checks
import pytest
import torch

from common.bundle_run import REPO, bundle_command

NAME = "msvmunet_acdc"
EPOCHS = 3
TINY = {"image_size": 64, "batch_size": 4, "num_workers": 0, "show_progress": False, "epochs": EPOCHS,
        "val_interval": 1}


@pytest.fixture(scope="module")
def data(module_tmp):
    return bundle_checks.tiny_acdc(module_tmp("acdc"))


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _start(root: str, data: str, **extra) -> subprocess.Popen:
    cmd = bundle_command(root, "training", {**TINY, "dataset_dir": data, **extra})
    return subprocess.Popen(cmd, cwd=root, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _digest(state: dict) -> str:
    """SHA-256 over every tensor of a (nested) state dict, keys included."""
    h = hashlib.sha256()

    def walk(obj, key=""):
        if isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")
        elif isinstance(obj, torch.Tensor):
            h.update(key.encode())
            h.update(obj.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(f"{key}={obj!r}".encode())

    walk(state)
    return h.hexdigest()


def _final(root: str) -> tuple[str, dict]:
    ckpt = torch.load(os.path.join(root, "models", "model_final.pt"), map_location="cpu", weights_only=True)
    state = torch.load(os.path.join(root, "models", "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    return _digest(ckpt["model"]), state


@pytest.fixture(scope="module")
def reference(data, module_tmp):
    root = bundle_checks.fresh_bundle(NAME, module_tmp("reference"))
    out = _finish(_start(root, data, resume=True))  # nothing to resume yet: starts from epoch 1
    assert "no checkpoint at" in out and "training starts from epoch 1" in out
    digest, state = _final(root)
    assert state["trainer"]["iteration"] == EPOCHS * 4 and state["trainer"]["epoch_length"] == 4
    return digest, state


# Same seed, same weights: each test below trains in two fresh processes (killed, then resumed) and
# must reach this reference's weights bit for bit, so a training that is not reproducible across
# processes fails them too. (A separate run from scratch, compared with the reference, cost ~40 s of CI.)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_mid_epoch_resumes_to_the_same_weights(data, reference, tmp_path, sig):
    root = bundle_checks.fresh_bundle(NAME, tmp_path)
    proc = _start(root, data)
    seen = []
    deadline = time.monotonic() + 600
    for line in proc.stdout:  # iteration log lines: "Epoch: 2/3, Iter: 1/4 -- train_loss: ..."
        seen.append(line)
        if f"Epoch: 2/{EPOCHS}, Iter: 2/4" in line:
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "".join(seen[-50:])
    proc.communicate(timeout=120)
    assert proc.returncode == -sig, "".join(seen[-50:])
    models = os.path.join(root, "models")
    assert not os.path.exists(os.path.join(models, "model_final.pt"))
    assert not [f for f in os.listdir(models) if ".partial" in f], os.listdir(models)
    state = torch.load(os.path.join(models, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    assert state["trainer"]["iteration"] == 4  # the end of epoch 1, the last completed epoch

    out = _finish(_start(root, data, resume=True))
    assert "resumed from" in out and "epoch 1, iteration 4" in out
    assert "Epoch: 1/3" not in out and f"Epoch: 2/{EPOCHS}, Iter: 1/4" in out  # epoch 1 was not trained again
    digest, state = _final(root)
    assert digest == reference[0]
    for key in ("optimizer", "lr_scheduler", "early_stop", "validator"):
        assert _digest(state[key]) == _digest(reference[1][key]), key
    assert state["trainer"] == reference[1]["trainer"]


def test_a_checkpoint_beyond_max_epochs_is_a_clear_error(data, reference, tmp_path):
    root = bundle_checks.fresh_bundle(NAME, tmp_path)
    torch.save(reference[1], os.path.join(root, "models", "checkpoint_last.pt"))
    proc = _start(root, data, resume=True, epochs=2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "checkpoint_last.pt: the checkpoint ends at epoch 3, after this run's 2 epochs" in out
