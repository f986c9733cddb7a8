"""MLflow tracking of bundle training (issue 9): ``--tracking mlflow`` against a real ``mlflow server``
(SQLite backend, artifacts served by the server) started on 127.0.0.1, and against the default local
store (MONAI 1.6: a SQLite file ``eval/mlruns.db`` with artifacts under ``eval/mlruns``; MLflow 3
refuses a plain ``./mlruns`` file store unless ``MLFLOW_ALLOW_FILE_STORE=true``). Each run is read
back through ``MlflowClient``: the bundle's hyper-parameters, per-epoch losses and validation Dice,
the executed config and the best checkpoint as artifacts.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import bundle_checks
import pytest
import torch

from common.bundle_run import run_workflow

mlflow = pytest.importorskip("mlflow")

NAME = "msvmunet_acdc"
TINY = {"image_size": 64, "batch_size": 4, "num_workers": 0, "show_progress": False, "epochs": 2, "val_interval": 1}


@pytest.fixture(scope="module")
def data(module_tmp):
    return bundle_checks.tiny_acdc(module_tmp("acdc"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(module_tmp):
    """``mlflow server`` with a SQLite backend and proxied artifacts, on a free loopback port."""
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if exe is None:
        pytest.skip("the mlflow command is not installed")
    folder = module_tmp("mlflow_server")
    port = _free_port()
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen(
        [exe, "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination",
         str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # no job runners: MLflow 3 otherwise starts 7 huey consumers, each importing mlflow (~40 s of CPU)
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def _check_run(uri: str, root: str, run_name: str, tmp_path) -> None:
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(NAME)  # the bundle's experiment_name
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["learning_rate"] == "0.0005" and params["image_size"] == "64" and params["batch_size"] == "4"
    assert params["network"] == "MSVMUNet tiny_0230s" and params["max_epochs"] == "2" and params["epoch_length"] == "4"
    dice = client.get_metric_history(run.info.run_id, "val_mean_dice")
    assert [m.step for m in dice] == [1, 2] and all(0.0 <= m.value <= 1.0 for m in dice)
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(loss) >= 2 and all(m.value == m.value for m in loss)  # per iteration and per epoch, finite
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "model.pt" in names, names
    assert any(n.startswith("config_") and n.endswith(".json") for n in names), names
    # the logged best checkpoint is the bundle's, byte for byte
    local = client.download_artifacts(run.info.run_id, "model.pt", str(tmp_path))
    with open(local, "rb") as a, open(os.path.join(root, "models", "model.pt"), "rb") as b:
        assert a.read() == b.read()
    best = torch.load(local, map_location="cpu", weights_only=True)  # one object: ignite saves its bare state dict
    assert "decoder.out_layers.0.out.weight" in best


def test_tracking_to_an_mlflow_server(data, server, tmp_path):
    root = bundle_checks.fresh_bundle(NAME, tmp_path / "bundle")
    run_workflow(root, "training", {**TINY, "dataset_dir": data, "tracking": "mlflow", "tracking_uri": server,
                                    "run_name": "server_run"}, capture=True)
    _check_run(server, root, "server_run", tmp_path)
    assert not os.path.exists(os.path.join(root, "eval", "mlruns.db"))  # nothing tracked locally


def test_tracking_to_the_default_local_store(data, tmp_path):
    root = bundle_checks.fresh_bundle(NAME, tmp_path / "bundle")
    run_workflow(root, "training", {**TINY, "dataset_dir": data, "tracking": "mlflow", "run_name": "local_run"},
                 capture=True)
    db = os.path.join(root, "eval", "mlruns.db")
    assert os.path.isfile(db)
    _check_run(f"sqlite:///{db}", root, "local_run", tmp_path)
    assert os.path.isdir(os.path.join(root, "eval", "mlruns"))  # the artifacts, next to the database
