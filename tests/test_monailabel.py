"""monailabel_app/: a real MONAI Label server serving the three bundles, called over REST like a client.

The server runs in the Python that has ``monailabel`` (an environment of its own, made by
``bash monailabel_app/setup_venv.sh``, see monailabel_app/README.md): ``$MONAILABEL_PYTHON``, taken as it
is (CI sets it: a broken environment there fails the tests, it does not skip them), else this Python when
it has monailabel, else ``<repo>/.venv-monailabel/bin/python``. The module is skipped only when
``$MONAILABEL_PYTHON`` is unset and neither of the other two imports monailabel.

Everything runs on copies in a temporary folder: the bundle folders (with freshly initialised
weights at 64 x 64 written to their ``models/model.pt``), the app folder and a studies folder made
from the synthetic sample data (cardiac MRI, abdominal CT and FLAIR volumes; labels for some).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import nibabel as nib
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLES = ("msvmunet_acdc", "mssmamba_synapse", "mambahunet_ms")
NUM_CLASSES = {"msvmunet_acdc": 4, "mssmamba_synapse": 9, "mambahunet_ms": 2}
PREFIX = {"msvmunet_acdc": "acdc_", "mssmamba_synapse": "ct_", "mambahunet_ms": "flair_"}
SIZE = 64  # in-plane size the networks run at here (MSSMamba's token grid is fixed by it)
DEPTH = 4  # slices per study: the networks run slice by slice, a few seconds per volume on 2 CPU cores
START_TIMEOUT = 300  # s, server start (imports, three networks built)
REQUEST_TIMEOUT = 180  # s, one REST call
TRAIN_TIMEOUT = 420  # s, the three short trainings together

pytestmark = pytest.mark.slow


def _monailabel_python() -> tuple[str | None, str]:
    """The interpreter to run the server with, or None and why there is none."""
    if os.environ.get("MONAILABEL_PYTHON"):
        return os.environ["MONAILABEL_PYTHON"], ""  # as it is: where it does not work, the server start fails
    tried = []
    for py in (sys.executable, os.path.join(ROOT, ".venv-monailabel", "bin", "python")):
        if not os.path.isfile(py):
            tried.append(f"{py} (missing)")
            continue
        res = subprocess.run([py, "-c", "import monailabel"], capture_output=True, text=True, timeout=120)
        if res.returncode == 0:
            return py, ""
        tried.append(f"{py} ({(res.stderr.strip().splitlines() or ['?'])[-1]})")
    return None, "; ".join(tried)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# the workspace: bundle copies with fresh weights, the app copy, a studies folder
# ------------------------------------------------------------------------------------------------


def _copy_bundle(name: str, dest: str) -> str:
    out = os.path.join(dest, name)
    shutil.copytree(os.path.join(ROOT, name), out,
                    ignore=shutil.ignore_patterns("sample_data", "eval", "*.pt", "*.ts", "__pycache__"))
    return out


def _write_fresh_weights(bundle: str) -> None:
    """A freshly initialised network of the bundle's inference config at ``SIZE``, as ``models/model.pt``."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    parser["image_size"] = SIZE
    parser["device"] = "cpu"
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def", instantiate=True)
    os.makedirs(os.path.join(bundle, "models"), exist_ok=True)
    torch.save(net.state_dict(), os.path.join(bundle, "models", "model.pt"))


def _save(path: str, array: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, affine), path)


def _make_studies(studies: str, scratch: str) -> dict[str, dict[str, list[str]]]:
    """Studies from the sample data: ``{bundle: {"labelled": [ids], "unlabelled": [ids]}}``.

    Labels go to ``labels/final`` in each model's own label values (Synapse: BTCV -> organ indices).
    """
    from common.data import BTCV_TO_SYNAPSE, make_acdc_sample, make_ms_sample, make_synapse_sample

    final = os.path.join(studies, "labels", "final")
    os.makedirs(final, exist_ok=True)
    out = {b: {"labelled": [], "unlabelled": []} for b in BUNDLES}

    def add(bundle, image_path, label_path, name, label_map=None):
        img = nib.load(image_path)
        _save(os.path.join(studies, name + ".nii.gz"), np.asarray(img.dataobj), img.affine)
        if label_path is None:
            out[bundle]["unlabelled"].append(name)
            return
        lab = np.asarray(nib.load(label_path).dataobj).astype(np.uint8)
        if label_map is not None:
            mapped = np.zeros_like(lab)
            for src, dst in label_map.items():
                mapped[lab == src] = dst
            lab = mapped
        _save(os.path.join(final, name + ".nii.gz"), lab, img.affine)
        out[bundle]["labelled"].append(name)

    acdc = make_acdc_sample(os.path.join(scratch, "acdc"), n_train=2, n_valid=0, n_test=1, depth=DEPTH)
    for pid, frame in ((1, 1), (1, 10), (2, 1)):
        base = os.path.join(acdc, "nifti", "training", f"patient{pid:03d}", f"patient{pid:03d}_frame{frame:02d}")
        add("msvmunet_acdc", base + ".nii.gz", base + "_gt.nii.gz", f"acdc_p{pid}_f{frame}")
    add("msvmunet_acdc", os.path.join(acdc, "nifti", "testing", "patient003", "patient003_frame01.nii.gz"), None,
        "acdc_p3_f1")

    syn = make_synapse_sample(os.path.join(scratch, "synapse"), n_train=2, n_test=1, depth=DEPTH)
    cases = sorted(f[3:7] for f in os.listdir(os.path.join(syn, "nifti", "img")))
    for i, cid in enumerate(cases):
        image = os.path.join(syn, "nifti", "img", f"img{cid}.nii.gz")
        label = os.path.join(syn, "nifti", "label", f"label{cid}.nii.gz") if i < 2 else None
        add("mssmamba_synapse", image, label, f"ct_{cid}", BTCV_TO_SYNAPSE)

    ms = make_ms_sample(os.path.join(scratch, "ms"), n_patients=3, depth=DEPTH)
    for p in (1, 2, 3):
        label = os.path.join(ms, f"Patient-{p}", f"{p}-LesionSeg-Flair.nii.gz") if p < 3 else None
        add("mambahunet_ms", os.path.join(ms, f"Patient-{p}", f"{p}-Flair.nii.gz"), label, f"flair_{p}")
    return out


# ------------------------------------------------------------------------------------------------
# a small REST client (standard library only)
# ------------------------------------------------------------------------------------------------


class Client:
    def __init__(self, base: str):
        self.base = base

    def request(self, method: str, path: str, query: dict | None = None, body: bytes | None = None,
                headers: dict | None = None, timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes, dict]:
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as res:
                return res.status, res.read(), dict(res.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read(), dict(err.headers)

    def get_json(self, path: str, **query):
        status, body, _ = self.request("GET", path, query or None)
        return status, (json.loads(body) if body else None)

    def post_json(self, path: str, payload: dict | None = None, **query):
        body = json.dumps(payload).encode() if payload is not None else None
        status, data, _ = self.request("POST", path, query or None, body, {"Content-Type": "application/json"})
        return status, (json.loads(data) if data else None)

    def infer(self, model: str, image_id: str | None = None, upload: str | None = None) -> tuple[int, bytes]:
        """``POST /infer/<model>`` on a datastore study (``image_id``) or an uploaded file; returns the label file."""
        boundary = uuid.uuid4().hex
        parts = [(b'Content-Disposition: form-data; name="params"\r\n\r\n', b"{}")]
        if upload:
            with open(upload, "rb") as f:
                parts.append((f'Content-Disposition: form-data; name="file"; filename="{os.path.basename(upload)}"\r\n'
                              "Content-Type: application/octet-stream\r\n\r\n".encode(), f.read()))
        body = b"".join(b"--" + boundary.encode() + b"\r\n" + head + data + b"\r\n" for head, data in parts)
        body += b"--" + boundary.encode() + b"--\r\n"
        query = {"output": "image"}
        if image_id:
            query["image"] = image_id
        status, data, _ = self.request("POST", f"/infer/{model}", query, body,
                                       {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return status, data


# ------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(module_tmp):
    py, why = _monailabel_python()
    if py is None:
        pytest.skip("monailabel is not installed: MONAILABEL_PYTHON is unset and neither this Python nor "
                    f".venv-monailabel imports it (create it with `bash monailabel_app/setup_venv.sh`): {why}")
    if not os.path.isfile(py):
        pytest.fail(f"MONAILABEL_PYTHON={py}: no such file")
    work = str(module_tmp("monailabel"))
    bundles_dir = os.path.join(work, "bundles")
    os.makedirs(bundles_dir)
    for name in BUNDLES:
        _write_fresh_weights(_copy_bundle(name, bundles_dir))
    app = os.path.join(work, "app")
    shutil.copytree(os.path.join(ROOT, "monailabel_app"), app,
                    ignore=shutil.ignore_patterns("model", "logs", "bin", "lib", "__pycache__"))
    studies = os.path.join(work, "studies")
    index = _make_studies(studies, os.path.join(work, "scratch"))

    port = _free_port()
    conf = {"models": ",".join(BUNDLES), "bundles_dir": bundles_dir, "image_size": str(SIZE),
            "num_workers": "0", "batch_size": "8"}
    conf.update({f"{b}.train_filter": PREFIX[b] + "*" for b in BUNDLES})
    cmd = [py, "-m", "monailabel.main", "start_server", "--app", app, "--studies", studies,
           "--host", "127.0.0.1", "--port", str(port)]
    for key, value in conf.items():
        cmd += ["--conf", key, value]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH", "")]))
    env.update({"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "MONAI_LABEL_SESSION_PATH": os.path.join(work, "sessions"),
                "MONAI_LABEL_TRACKING_ENABLED": "false", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")})
    log_path = os.path.join(work, "server.log")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def tail(n=4000):
        log.flush()
        with open(log_path, errors="replace") as f:
            return f.read()[-n:]

    client = Client(f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the MONAI Label server exited ({proc.returncode}) while starting:\n{tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the MONAI Label server did not answer /info/ within {START_TIMEOUT} s:\n{tail()}")
            try:
                status, _ = client.get_json("/info/")
                if status == 200:
                    break
            except (TimeoutError, urllib.error.URLError, ConnectionError):
                pass
            time.sleep(2)
        yield {"client": client, "work": work, "studies": studies, "bundles": bundles_dir, "index": index,
               "tail": tail, "proc": proc}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its training subprocesses (own session)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()


def _check_label(data: bytes, image_path: str, num_classes: int, where: str) -> None:
    """The returned label volume: same shape and affine as the image, values in 0..num_classes-1."""
    assert data[:2] == b"\x1f\x8b" or len(data) > 348, f"{where}: not a NIfTI file ({data[:200]!r})"
    path = os.path.join(os.path.dirname(image_path), f".result_{uuid.uuid4().hex}.nii.gz")
    try:
        with open(path, "wb") as f:
            f.write(data)
        label, image = nib.load(path), nib.load(image_path)
        arr = np.asarray(label.dataobj)
        assert arr.shape == image.shape, f"{where}: label shape {arr.shape} != image shape {image.shape}"
        np.testing.assert_allclose(label.affine, image.affine, atol=1e-4, err_msg=f"{where}: affine differs")
        values = np.unique(arr)
        assert values.min() >= 0 and values.max() <= num_classes - 1, f"{where}: label values {values}"
        assert np.all(values == np.round(values)), f"{where}: label values are not integers: {values}"
    finally:
        os.remove(path)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def test_info_lists_models_labels_and_trainers(server):
    status, info = server["client"].get_json("/info/")
    assert status == 200
    assert set(info["models"]) == set(BUNDLES), server["tail"]()
    for name in BUNDLES:
        with open(os.path.join(ROOT, name, "configs", "metadata.json")) as f:
            meta = json.load(f)
        channel_def = next(iter(meta["network_data_format"]["outputs"].values()))["channel_def"]
        expected = {v.lower(): int(k) for k, v in channel_def.items() if v.lower() != "background"}
        model = info["models"][name]
        assert model["labels"] == expected
        assert model["type"] == "segmentation" and model["dimension"] == 3
        assert model["description"]
    assert set(info["trainers"]) == set(BUNDLES)
    assert "right ventricle" in info["labels"] and "lesion" in info["labels"] and "liver" in info["labels"]
    status, datastore = server["client"].get_json("/datastore/", output="stats")
    assert status == 200
    n_labelled = sum(len(v["labelled"]) for v in server["index"].values())
    n_all = n_labelled + sum(len(v["unlabelled"]) for v in server["index"].values())
    assert datastore["total"] == n_all and datastore["completed"] == n_labelled


@pytest.mark.parametrize("model", BUNDLES)
def test_infer_on_a_study(server, model):
    image_id = server["index"][model]["unlabelled"][0]
    t0 = time.monotonic()
    status, data = server["client"].infer(model, image_id=image_id)
    assert status == 200, f"{model}: HTTP {status}: {data[:2000]!r}\n{server['tail']()}"
    _check_label(data, os.path.join(server["studies"], image_id + ".nii.gz"), NUM_CLASSES[model], model)
    print(f"{model}: infer on {image_id} in {time.monotonic() - t0:.1f} s")


def test_infer_on_an_uploaded_file(server, tmp_path):
    """A volume that is not in the datastore, sent with the request (what a client without a datastore does)."""
    src = os.path.join(server["studies"], server["index"]["mambahunet_ms"]["labelled"][0] + ".nii.gz")
    img = nib.load(src)
    c, s = np.cos(np.pi / 7), np.sin(np.pi / 7)
    rotation = np.array([[c, -s, 0, 0], [s, c, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    moved = rotation @ img.affine  # an oblique affine of its own, to be kept in the output
    moved[:3, 3] += (12.5, -3.0, 40.0)
    upload = str(tmp_path / "upload_flair.nii.gz")
    _save(upload, np.asarray(img.dataobj)[:, 8:, :], moved)
    status, data = server["client"].infer("mambahunet_ms", upload=upload)
    assert status == 200, f"HTTP {status}: {data[:2000]!r}"
    _check_label(data, upload, 2, "upload")


def test_unknown_model_is_an_error(server):
    """MONAI Label answers an unknown model with HTTP 500 ("Internal Server Error"); the server stays up."""
    status, _ = server["client"].infer("no_such_model", image_id=server["index"]["msvmunet_acdc"]["unlabelled"][0])
    assert status >= 400
    assert server["client"].get_json("/info/")[0] == 200


def test_eight_parallel_infer_requests(server):
    jobs = []
    for i in range(8):
        model = BUNDLES[i % 3]
        ids = server["index"][model]["labelled"] + server["index"][model]["unlabelled"]
        jobs.append((model, ids[i % len(ids)]))
    client = server["client"]
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(client.infer, model, image_id) for model, image_id in jobs]
        results = [f.result(timeout=REQUEST_TIMEOUT * 2) for f in futures]
    for (model, image_id), (status, data) in zip(jobs, results):
        assert status == 200, f"{model} on {image_id}: HTTP {status}: {data[:2000]!r}"
        _check_label(data, os.path.join(server["studies"], image_id + ".nii.gz"), NUM_CLASSES[model],
                     f"{model} on {image_id}")
    print(f"8 parallel infer requests in {time.monotonic() - t0:.1f} s")


def _wait_for_training(client, deadline: float) -> None:
    while time.monotonic() < deadline:
        status, _ = client.get_json("/train/", check_if_running="true")
        if status == 404:  # nothing running; the queue is empty only when the last task has ended too
            status, tasks = client.get_json("/train/", all="true")
            if status == 200 and tasks and all(t["status"] not in ("SUBMITTED", "RUNNING") for t in tasks):
                return
        time.sleep(3)
    raise AssertionError("training did not finish in time")


def test_train_each_model_then_infer_with_the_new_weights(server):
    client = server["client"]
    params = {"max_epochs": 1, "val_split": 0.34, "num_workers": 0, "batch_size": 8, "device": "cpu"}
    before = {b: os.stat(os.path.join(server["bundles"], b, "models", "model.pt")).st_mtime_ns for b in BUNDLES}
    t0 = time.monotonic()
    for model in BUNDLES:
        status, task = client.post_json(f"/train/{model}", params, enqueue="true")
        assert status == 200, f"{model}: HTTP {status}: {task}"
        assert task["status"] in ("SUBMITTED", "RUNNING"), task
    _wait_for_training(client, time.monotonic() + TRAIN_TIMEOUT)
    status, tasks = client.get_json("/train/", all="true")
    assert status == 200 and len(tasks) == 3
    for task in tasks:
        assert task["status"] == "DONE", (f"{task['request']['model']}: {task['status']}\n"
                                          + "\n".join(task.get("details") or []) + "\n" + server["tail"]())
    for b in BUNDLES:
        after = os.stat(os.path.join(server["bundles"], b, "models", "model.pt")).st_mtime_ns
        assert after > before[b], f"{b}: training did not write models/model.pt"
    print(f"3 trainings (1 epoch each) in {time.monotonic() - t0:.1f} s")
    # the infer tasks reload the new weights (the checkpoint's time stamp changed)
    for model in BUNDLES:
        image_id = server["index"][model]["unlabelled"][0]
        status, data = client.infer(model, image_id=image_id)
        assert status == 200, f"{model}: HTTP {status}: {data[:2000]!r}"
        _check_label(data, os.path.join(server["studies"], image_id + ".nii.gz"), NUM_CLASSES[model], model)
