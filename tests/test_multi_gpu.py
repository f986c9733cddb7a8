"""``multi_gpu_train.json`` under ``torchrun --nproc_per_node 2`` on CPU (gloo), as on several GPUs (issue 9).

A short MSVM-UNet run on a tiny synthetic ACDC set: DistributedDataParallel keeps both ranks'
weights identical, the distributed sampler halves each rank's epoch, only rank 0 writes
checkpoints and logs, the best checkpoint has the single-process key names (so the single-process
inference config loads it), and a resumed distributed run picks up the training checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import bundle_checks
import pytest
import torch

from common.bundle_run import REPO, bundle_command, run_workflow

NAME = "msvmunet_acdc"
TINY = {"image_size": 64, "batch_size": 2, "num_workers": 0, "show_progress": False, "epochs": 2, "val_interval": 1}


@pytest.fixture(scope="module")
def data(module_tmp):
    return bundle_checks.tiny_acdc(module_tmp("acdc"))


def _torchrun(root: str, data: str, **extra) -> subprocess.CompletedProcess:
    if shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None:
        pytest.skip("torchrun is not installed next to this Python")
    # every rank saves its weights at the end, to compare them (a test-only extra config file)
    extra_cfg = os.path.join(root, "rank_weights.json")
    with open(extra_cfg, "w") as f:
        json.dump({"finalize": [
            "$torch.save(@network.module.state_dict(), os.path.join(@output_dir, f'rank{dist.get_rank()}.pt'))",
            "$dist.is_initialized() and dist.destroy_process_group()"]}, f)
    cmd = bundle_command(root, "training", {**TINY, "dataset_dir": data, **extra})
    i = cmd.index("--config_file")
    cmd[i + 1] = str(["configs/train.json", "configs/multi_gpu_train.json", extra_cfg])
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", "--nproc_per_node", "2",
           *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH", "")]))}
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return res


def test_two_process_training_with_gloo(data, tmp_path):
    root = bundle_checks.fresh_bundle(NAME, tmp_path)
    res = _torchrun(root, data)
    out = res.stdout + res.stderr
    # 16 training slices, 2 ranks x batch 2: 4 iterations per epoch and rank (8 single-process)
    assert "Epoch: 2/2, Iter: 4/4" in out and "Iter: 5/" not in out
    eval_dir = os.path.join(root, "eval")
    w0 = torch.load(os.path.join(eval_dir, "rank0.pt"), weights_only=True)
    w1 = torch.load(os.path.join(eval_dir, "rank1.pt"), weights_only=True)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    models = sorted(os.listdir(os.path.join(root, "models")))
    assert models == ["README.md", "checkpoint_last.pt", "model.pt", "model_final.pt"], models
    final = torch.load(os.path.join(root, "models", "model_final.pt"), weights_only=True)["model"]
    assert final.keys() == w0.keys() and all(torch.equal(final[k], w0[k]) for k in w0)  # no "module." prefix
    state = torch.load(os.path.join(root, "models", "checkpoint_last.pt"), weights_only=True)
    assert state["trainer"]["iteration"] == 8 and all(torch.equal(state["network"][k], w0[k]) for k in w0)
    # rank 0 alone logs: one line per iteration; TensorBoard scalars only in rank 0's event files
    # (MONAI creates every handler's SummaryWriter, so rank 1 leaves empty event files)
    assert out.count("Epoch: 2/2, Iter: 4/4 -- train_loss") == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {}
    for f in os.listdir(eval_dir):
        if f.startswith("events.out.tfevents"):
            acc = EventAccumulator(os.path.join(eval_dir, f))
            acc.Reload()
            tags[f] = set(acc.Tags()["scalars"])
    with_data = {f: t for f, t in tags.items() if t}
    assert len(with_data) == 2 and set.union(*with_data.values()) >= {"train_loss", "val_mean_dice"}, tags
    assert len({f.split(".")[-2] for f in with_data}) == 1, tags  # one process (pid) wrote them

    # the distributed best checkpoint serves single-process inference
    nifti = os.path.join(os.path.dirname(data), "nifti", "testing")
    run_workflow(root, "inference", {"image_size": 64, "dataset_dir": nifti, "output_dir": str(tmp_path / "pred")},
                 capture=True)
    assert any(f.endswith("_seg.nii.gz") for _, _, fs in os.walk(tmp_path / "pred") for f in fs)

    # resume the distributed run for one more epoch from its training checkpoint
    res = _torchrun(root, data, epochs=3, resume=True)
    assert "resumed from" in res.stdout + res.stderr
    state = torch.load(os.path.join(root, "models", "checkpoint_last.pt"), weights_only=True)
    assert state["trainer"]["iteration"] == 12
