"""Bad input through the real bundle configs: one clear error naming the file, and no half-written output.

Each case builds a tiny synthetic dataset (nibabel, 32 x 32 x 3 volumes) in ``tmp_path``, runs a
bundle workflow in this process through ``monai.bundle.ConfigWorkflow`` (what ``python -m
monai.bundle run`` does) with small overrides, and checks the error's type, that its message names
the file and the problem, and that no partial output was left. Two cases run the CLI in a
subprocess to check what a user sees on stderr: one line, no traceback.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess

import bundle_checks
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.losses import DiceCELoss

from common.bundle_run import BUNDLES, REPO, bundle_command
from common.data import find_ms_cases, split_cases
from common.guards import (
    AtomicSaveImage,
    BadInputError,
    BundleError,
    MissingInputError,
    NonFiniteLossError,
    OutputNotWritableError,
    atomic_write,
    bundle_error_message,
)

NAMES = ("msvmunet_acdc", "mssmamba_synapse", "mambahunet_ms")
SIZE = {"msvmunet_acdc": 32, "mssmamba_synapse": 64, "mambahunet_ms": 32}  # smallest the networks take
CPU = "$torch.device('cpu')"
SHAPE = (32, 32, 3)


# ---------------------------------------------------------------- data


def _save(path: str, array: np.ndarray) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    return path


def _pair(name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A valid image and label of the bundle's kind (ACDC MR, BTCV CT in HU, FLAIR + lesion mask)."""
    label = np.zeros(SHAPE, np.uint8)
    label[8:20, 8:20] = {"msvmunet_acdc": 3, "mssmamba_synapse": 6, "mambahunet_ms": 1}[name]
    label[10:14, 22:28] = {"msvmunet_acdc": 1, "mssmamba_synapse": 1, "mambahunet_ms": 1}[name]
    if name == "mssmamba_synapse":
        image = rng.normal(40, 30, SHAPE).astype(np.int16)
    else:
        image = (rng.random(SHAPE) * 500 + 100 * label).astype(np.float32)
    return image, label


def _defective(image: np.ndarray, label: np.ndarray, name: str, defect: str | None):
    if defect == "shape":
        label = np.zeros((32, 32, 4), label.dtype)
    elif defect == "2d":
        image, label = image[..., 0], label[..., 0]
    elif defect == "4d":
        image = np.stack([image, image], -1)
    elif defect == "channels":
        image = np.stack([image, image], -1)[..., None, :]  # NIfTI multi-channel: (x, y, z, 1, c)
    elif defect == "nonfinite":
        image = image.astype(np.float32)
        image[3, 3, 1], image[4, 4, 2] = np.nan, np.inf
    elif defect == "labels":
        label = label.astype(np.int16)
        if name == "mambahunet_ms":
            label[0, 0, 0] = -1
        else:
            outside = {"msvmunet_acdc": (7, 9), "mssmamba_synapse": (20, 21)}[name]
            label[0, 0, 0], label[0, 1, 0] = outside
    return image, label


def _truncate(path: str) -> None:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(raw[: len(raw) // 3])


def make_dataset(name: str, folder, defect: str | None = None) -> tuple[str, dict]:
    """A two- or three-case dataset in the bundle's raw NIfTI layout; ``defect`` goes into the first
    training case. Returns the dataset folder and that case's ``image`` / ``label`` paths."""
    rng = np.random.default_rng(0)
    root = str(folder)
    if name == "msvmunet_acdc":
        cases = [(os.path.join(root, sub, f"patient{p:03d}", f"patient{p:03d}_frame01.nii.gz"),
                  os.path.join(root, sub, f"patient{p:03d}", f"patient{p:03d}_frame01_gt.nii.gz"))
                 for sub, p in (("training", 1), ("testing", 2))]
    elif name == "mssmamba_synapse":  # 0005 trains, 0001 is one of TransUNet's test cases
        cases = [(os.path.join(root, "img", f"img{c}.nii.gz"), os.path.join(root, "label", f"label{c}.nii.gz"))
                 for c in ("0005", "0001")]
    else:
        cases = [(os.path.join(root, f"Patient-{p}", f"{p}-Flair.nii.gz"),
                  os.path.join(root, f"Patient-{p}", f"{p}-LesionSeg-Flair.nii.gz")) for p in (1, 2, 3)]
    for image_path, label_path in cases:
        _save(image_path, _pair(name, rng)[0])
        _save(label_path, _pair(name, rng)[1])
    first = cases[0]
    if name == "mambahunet_ms":  # the patient the seeded split trains on
        train = split_cases(find_ms_cases(root))["train"][0]
        first = (train["image"], train["label"])
    if defect == "corrupt":
        _truncate(first[0])
    elif defect is not None:
        image, label = _defective(*_pair(name, rng), name, defect)
        _save(first[0], image)
        _save(first[1], label)
    return root, {"image": first[0], "label": first[1]}


# ---------------------------------------------------------------- running the bundles


def train_overrides(name: str, dataset_dir: str) -> dict:
    out = {"dataset_dir": dataset_dir, "image_size": SIZE[name], "batch_size": 4, "num_workers": 0,
           "show_progress": False, "val_interval": 1, "device": CPU}
    if name == "mambahunet_ms":
        out["max_iterations"] = 1  # one epoch
    else:
        out["epochs"] = 1
    if name == "msvmunet_acdc":
        out["val_split"] = "test"  # raw ACDC: the testing/ patients
    return out


def run_bundle(name: str, root: str, workflow: str, **overrides) -> None:
    """One workflow of bundle ``name`` (its configs in the repository) with outputs under ``root``."""
    configs = [os.path.join(REPO, name, c) for c in BUNDLES[name][workflow]]
    wf = ConfigWorkflow(configs, meta_file=os.path.join(REPO, name, "configs", "metadata.json"), logging_file=False,
                        run_id=workflow, bundle_root=root, **overrides)
    wf.initialize()
    try:
        wf.run()
    finally:
        wf.finalize()


def raised(excinfo) -> BundleError:
    """The BundleError behind a (possibly MONAI-wrapped) exception; fails when there is none."""
    e = excinfo.value
    while e is not None and not isinstance(e, BundleError):
        e = e.__cause__ or e.__context__
    assert e is not None, f"no BundleError behind {excinfo.value!r}"
    assert bundle_error_message(excinfo.value) == f"{type(e).__name__}: {e}"
    return e


def no_partial_files(root: str) -> list[str]:
    """Every file under ``root`` (asserting none of them is a temporary or partial one)."""
    found = []
    for base, _, files in os.walk(root):
        for f in files:
            assert ".partial" not in f and not f.endswith(".tmp"), os.path.join(base, f)
            found.append(os.path.relpath(os.path.join(base, f), root))
    return found


def checkpoints(root: str) -> list[str]:
    return [f for f in no_partial_files(root) if f.endswith(".pt")]


def write_checkpoint(name: str, path: str) -> str:
    """The state dict of the bundle's network at test size, as a checkpoint file."""
    from common.networks.mambahunet import MambaHUNet
    from common.networks.mssmamba import MSSMamba
    from common.networks.msvmunet import MSVMUNet

    net = {"msvmunet_acdc": lambda: MSVMUNet(1, 4, variant="tiny_0230s"),
           "mssmamba_synapse": lambda: MSSMamba(1, 9, img_size=SIZE[name]),
           "mambahunet_ms": lambda: MambaHUNet(1, 2)}[name]()
    torch.save(net.state_dict(), path)
    return path


def infer_overrides(name: str, dataset_dir: str, out_dir: str, checkpoint: str) -> dict:
    return {"dataset_dir": dataset_dir, "output_dir": out_dir, "checkpoint": checkpoint, "image_size": SIZE[name],
            "device": CPU, "num_workers": 0}


# ---------------------------------------------------------------- data folders


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_missing_or_empty_data_directory(name, kind, tmp_path):
    data = tmp_path / "data"
    if kind == "empty":
        data.mkdir()
    with pytest.raises(Exception) as excinfo:
        run_bundle(name, str(tmp_path / "run"), "training", **train_overrides(name, str(data)))
    err = raised(excinfo)
    assert err.path == str(data)
    if kind == "missing":
        assert isinstance(err, MissingInputError) and ("not found" in str(err) or "does not exist" in str(err))
    else:
        assert isinstance(err, BadInputError) and "the folder is empty" in str(err)
    assert checkpoints(str(tmp_path / "run")) == []


@pytest.mark.parametrize("name", NAMES)
def test_inference_on_a_missing_or_empty_folder(name, tmp_path):
    (tmp_path / "empty").mkdir()
    for folder, problem in (("missing", "input folder does not exist"), ("empty", "no ")):
        with pytest.raises(Exception) as excinfo:
            run_bundle(name, str(tmp_path / "run"), "inference",
                       **infer_overrides(name, str(tmp_path / folder), str(tmp_path / "out"), "unused.pt"))
        err = raised(excinfo)
        assert isinstance(err, MissingInputError) and err.path == str(tmp_path / folder) and problem in str(err)
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------- bad volumes in training

BAD_VOLUMES = {
    "corrupt": ("image", "cannot read this"),
    "shape": ("image", "label shape (32, 32, 4)"),
    "2d": ("image", "is 2D (shape (32, 32)): expected a 3D volume"),
    "4d": ("image", "is 4D (shape (32, 32, 3, 2)): expected a 3D volume, one per file"),
    "nonfinite": ("image", "has NaN or infinite voxels (1 NaN, 1 infinite)"),
    "labels": ("label", "has values"),
    "channels": ("image", "has 2 channels (shape (32, 32, 3, 1, 2)): the network takes 1"),
}


def _expected_problem(name: str, defect: str) -> str:
    if defect == "shape":
        return "mask shape (32, 32, 4)" if name == "mambahunet_ms" else "label shape (32, 32, 4)"
    if defect == "labels":
        return {"msvmunet_acdc": "label has values 7, 9 that are not class indices 0..3 of this bundle",
                "mssmamba_synapse": "label has values 20, 21 that are not BTCV labels 0..13",
                "mambahunet_ms": "lesion mask has values -1 that are not mask labels"}[name]
    return BAD_VOLUMES[defect][1]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("defect", list(BAD_VOLUMES))
def test_bad_volume_in_training(name, defect, tmp_path):
    """Corrupt or truncated NIfTI, image and label of different shapes, 2D, 4D, NaN/Inf voxels,
    label values outside the classes, two channels: each stops training before it starts."""
    data, bad = make_dataset(name, tmp_path / "data", defect)
    with pytest.raises(Exception) as excinfo:
        run_bundle(name, str(tmp_path / "run"), "training", **train_overrides(name, data))
    err = raised(excinfo)
    assert isinstance(err, BadInputError)
    assert err.path == bad[BAD_VOLUMES[defect][0]], str(err)
    assert _expected_problem(name, defect) in str(err), str(err)
    assert "\n" not in str(err) and len(str(err)) < 600
    assert checkpoints(str(tmp_path / "run")) == []


# ---------------------------------------------------------------- bad volumes at inference


@pytest.fixture(scope="module")
def acdc_checkpoint(module_tmp):
    return write_checkpoint("msvmunet_acdc", str(module_tmp("ckpt") / "model.pt"))


@pytest.mark.parametrize("defect", ["corrupt", "2d", "4d", "channels", "nonfinite"])
def test_bad_volume_at_inference(defect, tmp_path, acdc_checkpoint):
    """The inference config's loader (common.guards.LoadVolumed) names the file; the good volume
    before it is segmented and saved whole, nothing is left of the bad one."""
    rng = np.random.default_rng(1)
    data = tmp_path / "images"
    good = _save(str(data / "a_good.nii.gz"), _pair("msvmunet_acdc", rng)[0])
    bad = str(data / "b_bad.nii.gz")
    image, _ = _defective(*_pair("msvmunet_acdc", rng), "msvmunet_acdc", None if defect == "corrupt" else defect)
    _save(bad, image)
    if defect == "corrupt":
        _truncate(bad)
    out = tmp_path / "out"
    with pytest.raises(Exception) as excinfo:
        run_bundle("msvmunet_acdc", str(tmp_path / "run"), "inference",
                   **infer_overrides("msvmunet_acdc", str(data), str(out), acdc_checkpoint))
    err = raised(excinfo)
    assert isinstance(err, BadInputError) and err.path == bad
    assert BAD_VOLUMES[defect][1] in str(err), str(err)
    assert no_partial_files(str(out)) == ["a_good_seg.nii.gz"]
    assert nib.load(str(out / "a_good_seg.nii.gz")).shape == nib.load(good).shape


def test_a_failing_write_leaves_no_file(tmp_path, monkeypatch):
    """AtomicSaveImage (the configs' AtomicSaveImaged): a writer that fails half-way leaves nothing."""
    from monai.data import MetaTensor, NibabelWriter

    def half_write(self, filename, verbose=True, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\x1f\x8b half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(NibabelWriter, "write", half_write)
    saver = AtomicSaveImage(output_dir=str(tmp_path), output_postfix="seg", separate_folder=False,
                            writer="NibabelWriter")
    img = MetaTensor(torch.zeros(1, 4, 4, 2), meta={"filename_or_obj": "/x/case1.nii.gz"})
    with pytest.raises(OutputNotWritableError, match=r"case1_seg.nii.gz: cannot write this file \(.*No space left"):
        saver(img)
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(str(tmp_path / "report.csv"), lambda f: (f.write("half"), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_from_another_network(tmp_path):
    data, _ = make_dataset("msvmunet_acdc", tmp_path / "data")
    other = write_checkpoint("mambahunet_ms", str(tmp_path / "mambahunet.pt"))
    out = tmp_path / "out"
    with pytest.raises(Exception) as excinfo:
        run_bundle("msvmunet_acdc", str(tmp_path / "run"), "inference",
                   **infer_overrides("msvmunet_acdc", os.path.join(data, "testing"), str(out), other))
    err = raised(excinfo)
    assert isinstance(err, BadInputError) and err.path == other
    msg = str(err)
    assert "checkpoint does not fit MSVMUNet" in msg and "tensors are missing" in msg and "not in the network" in msg
    assert len(msg) < 800, msg  # a summary, not PyTorch's list of every key
    assert no_partial_files(str(out)) == []


def test_checkpoint_that_needs_unpickling_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:  # unpickling it would run Path.touch(marker)
        def __reduce__(self):
            return (type(marker).touch, (marker,))

    ckpt = str(tmp_path / "model.pt")
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload()}, ckpt)
    data, _ = make_dataset("msvmunet_acdc", tmp_path / "data")
    with pytest.raises(Exception) as excinfo:
        run_bundle("msvmunet_acdc", str(tmp_path / "run"), "evaluating",
                   **{**train_overrides("msvmunet_acdc", data), "checkpoint": ckpt, "output_dir": str(tmp_path / "ev")})
    err = raised(excinfo)
    assert isinstance(err, BadInputError) and err.path == ckpt
    assert "refused to load this checkpoint: it needs code to be unpickled" in str(err)
    assert "weights_only=True" in str(err)
    assert not marker.exists()
    assert [f for f in no_partial_files(str(tmp_path / "ev")) if not f.startswith("events")] == []


# ---------------------------------------------------------------- training


class NaNFromEpoch2:
    """DiceCE loss that turns NaN from the second epoch on (one iteration per epoch here)."""

    def __init__(self) -> None:
        self.loss, self.calls = DiceCELoss(to_onehot_y=True, softmax=True), 0

    def __call__(self, pred, target):
        self.calls += 1
        loss = self.loss(pred, target)
        return loss * float("nan") if self.calls > 1 else loss


def test_non_finite_loss_stops_training_and_keeps_the_checkpoint(tmp_path):
    data, _ = make_dataset("msvmunet_acdc", tmp_path / "data")
    root = str(tmp_path / "run")
    overrides = {**train_overrides("msvmunet_acdc", data), "epochs": 2, "batch_size": 8, "loss": NaNFromEpoch2()}
    configs = [os.path.join(REPO, "msvmunet_acdc", "configs", "train.json")]
    wf = ConfigWorkflow(configs, logging_file=False, run_id="training", bundle_root=root, **overrides)
    wf.initialize()
    with pytest.raises(Exception) as excinfo:
        wf.run()
    err = raised(excinfo)
    assert isinstance(err, NonFiniteLossError)
    assert "the loss is NaN at epoch 2, iteration 2 (batch 1 of 1 in this epoch; its samples: patient001_frame01 slice" \
        in str(err), str(err)
    assert "optimizer step was not taken" in str(err)
    # the checkpoints of epoch 1 (the best model of its validation; the resume checkpoint where the config
    # writes one) are on disk, loadable, and hold the weights still in memory: the NaN loss reached neither
    # the optimizer nor a checkpoint, and no "final" checkpoint was written for the failed run
    found = checkpoints(root)
    assert os.path.join("models", "model.pt") in found and os.path.join("models", "model_final.pt") not in found
    # parameters only: the BatchNorm statistics in memory did see the last forward pass
    weights = dict(wf.parser.get_parsed_content("network").named_parameters())
    for name in found:
        saved = torch.load(os.path.join(root, name), map_location="cpu", weights_only=True)
        saved = saved.get("network", saved.get("model", saved))
        assert all(torch.isfinite(v.float()).all() for v in saved.values()), name
        for key, value in weights.items():
            assert torch.equal(saved[key], value.detach()), (name, key)


# ---------------------------------------------------------------- outputs


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder no file can be written to, even as root (immutable where chattr works; otherwise a
    path below a regular file)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    os.chmod(folder, 0o555)

    def writable():
        try:
            (folder / "probe").touch()
        except OSError:
            return False
        (folder / "probe").unlink()
        return True

    immutable = False
    if writable() and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if writable():
        (tmp_path / "a_file").write_text("")
        yield str(tmp_path / "a_file" / "out")
    else:
        yield str(folder)
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    os.chmod(folder, 0o755)


@pytest.mark.parametrize("workflow", ["training", "evaluating", "inference"])
def test_output_directory_not_writable(workflow, tmp_path, unwritable_dir, acdc_checkpoint):
    data, _ = make_dataset("msvmunet_acdc", tmp_path / "data")
    key = {"training": "ckpt_dir", "evaluating": "output_dir", "inference": "output_dir"}[workflow]
    if workflow == "inference":
        overrides = infer_overrides("msvmunet_acdc", os.path.join(data, "testing"), unwritable_dir, acdc_checkpoint)
    else:
        overrides = {**train_overrides("msvmunet_acdc", data), key: unwritable_dir, "checkpoint": acdc_checkpoint}
    with pytest.raises(Exception) as excinfo:
        run_bundle("msvmunet_acdc", str(tmp_path / "run"), workflow, **overrides)
    err = raised(excinfo)
    assert isinstance(err, OutputNotWritableError) and err.path == unwritable_dir
    assert "output folder" in str(err)
    assert checkpoints(str(tmp_path / "run")) == []


# ---------------------------------------------------------------- what a CLI user sees


def _cli(name: str, root: str, workflow: str, overrides: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    env.pop("MONAI_DEBUG", None)
    return subprocess.run(bundle_command(root, workflow, overrides), cwd=root, env=env, capture_output=True, text=True)


def _assert_one_clear_line(res: subprocess.CompletedProcess, expected: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[-2] == expected, res.stderr[-3000:]
    assert lines[-1] == "(set MONAI_DEBUG=1 for the full traceback)"


def test_cli_prints_one_line_for_a_bad_label(tmp_path):
    root = bundle_checks.fresh_bundle("msvmunet_acdc", tmp_path)
    data, bad = make_dataset("msvmunet_acdc", tmp_path / "data", "labels")
    overrides = {k: v for k, v in train_overrides("msvmunet_acdc", data).items() if k != "device"}
    res = _cli("msvmunet_acdc", root, "training", overrides)
    _assert_one_clear_line(res, f"BadInputError: {bad['label']}: label has values 7, 9 that are not class indices "
                                "0..3 of this bundle (0 background, 1 RV, 2 Myo, 3 LV)")
    assert checkpoints(os.path.join(root, "models")) == []


def test_cli_prints_one_line_for_a_corrupt_image_at_inference(tmp_path):
    root = bundle_checks.fresh_bundle("mambahunet_ms", tmp_path)
    data, bad = make_dataset("mambahunet_ms", tmp_path / "data", "corrupt")
    ckpt = write_checkpoint("mambahunet_ms", str(tmp_path / "model.pt"))
    out = tmp_path / "out"
    res = _cli("mambahunet_ms", root, "inference", {"dataset_dir": data, "output_dir": str(out), "checkpoint": ckpt,
                                                    "image_size": 32})
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[-2].startswith(f"BadInputError: {bad['image']}: cannot read this image file: it is corrupt, "
                                "truncated or not an image ("), res.stderr[-3000:]
    _assert_one_clear_line(res, lines[-2])
    assert not [f for f in no_partial_files(str(out)) if os.path.basename(bad["image"]).split(".")[0] in f]
