"""MS FLAIR data: layouts, patient split, loader and preprocessing, bad input, lesion metrics."""

from __future__ import annotations

import gzip
import json
import math
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.handlers import ConfusionMatrix, HausdorffDistance, IgniteMetricHandler, from_engine
from monai.metrics import DiceMetric, MeanIoU

from common.data.ms import (
    LoadMSFlaird,
    PreprocessFlaird,
    find_flair_images,
    find_ms_cases,
    flair_preprocessing,
    make_ms_sample,
    ms_datalist,
    split_cases,
)
from common.metrics import LesionReport, SegmentationReport, lesion_stats


@pytest.fixture(scope="module")
def sample(module_tmp):
    return make_ms_sample(str(module_tmp("ms")), n_patients=12, size=48, depth=8)


def _save(path, arr, spacing=(1.0, 1.0, 3.0)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.diag([*spacing, 1.0])), path)


def test_muslim_layout_found_and_sorted_by_patient_number(sample):
    cases = find_ms_cases(sample)
    assert [c["case"] for c in cases] == [f"Patient-{i}" for i in range(1, 13)]
    assert cases[9]["image"].endswith(os.path.join("Patient-10", "10-Flair.nii.gz"))
    assert cases[9]["label"].endswith(os.path.join("Patient-10", "10-LesionSeg-Flair.nii.gz"))
    assert {c["layout"] for c in cases} == {"muslim2022"}


def test_msseg2_layout(tmp_path):
    make_ms_sample(str(tmp_path), n_patients=3, size=32, depth=6, layout="msseg2")
    _save(str(tmp_path / "001" / "flair_time01_on_middle_space.nii.gz"), np.zeros((32, 32, 6), np.int16))
    cases = find_ms_cases(str(tmp_path))
    assert [c["case"] for c in cases] == ["001", "002", "003"]
    assert all(c["image"].endswith("flair_time02_on_middle_space.nii.gz") for c in cases)
    assert all(c["label"].endswith("ground_truth.nii.gz") for c in cases)
    assert [os.path.basename(f) for f in find_flair_images(str(tmp_path))] == \
        ["flair_time02_on_middle_space.nii.gz"] * 3


def test_find_flair_images_skips_masks_and_other_sequences(sample, tmp_path):
    assert len(find_flair_images(sample)) == 12
    _save(str(tmp_path / "Patient-1" / "1-Flair.nii"), np.zeros((8, 8, 4)))
    _save(str(tmp_path / "Patient-1" / "1-T1.nii"), np.zeros((8, 8, 4)))
    _save(str(tmp_path / "Patient-1" / "1-LesionSeg-Flair.nii"), np.zeros((8, 8, 4)))
    assert [os.path.basename(f) for f in find_flair_images(str(tmp_path))] == ["1-Flair.nii"]
    other = tmp_path / "plain"
    _save(str(other / "sub-01.nii.gz"), np.zeros((8, 8, 4)))
    _save(str(other / "sub-01_mask.nii.gz"), np.zeros((8, 8, 4)))
    assert [os.path.basename(f) for f in find_flair_images(str(other))] == ["sub-01.nii.gz"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_flair_images(str(tmp_path / "missing"))


def test_missing_empty_and_incomplete_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_ms_cases(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="holds no MS patients"):
        find_ms_cases(str(tmp_path))
    _save(str(tmp_path / "Patient-3" / "3-Flair.nii.gz"), np.zeros((8, 8, 4)))
    with pytest.raises(FileNotFoundError, match=r"Patient-3.*no lesion mask"):
        find_ms_cases(str(tmp_path))


def test_split_is_by_patient_deterministic_and_70_15_15(sample):
    cases = find_ms_cases(sample)
    split = split_cases(cases, seed=0)
    names = {k: [c["case"] for c in v] for k, v in split.items()}
    assert [len(names[k]) for k in ("train", "valid", "test")] == [8, 2, 2]
    assert sorted(sum(names.values(), [])) == sorted(c["case"] for c in cases)
    assert names == {k: [c["case"] for c in v] for k, v in split_cases(cases, seed=0).items()}
    assert names != {k: [c["case"] for c in v] for k, v in split_cases(cases, seed=1).items()}
    # slices of a patient never cross splits
    train = ms_datalist(sample, "train")
    test = ms_datalist(sample, "test")
    assert len(train) == 8 * 8 and all("slice" in d for d in train)
    assert {d["case"] for d in train}.isdisjoint({d["case"] for d in test})
    assert all("slice" not in d for d in test) and len(test) == 2
    assert len(ms_datalist(sample, "all")) == 12
    with pytest.raises(ValueError, match="fractions"):
        split_cases(cases, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="split must be"):
        ms_datalist(sample, "validation")


def test_loader_slices_equal_volume_slices_and_masks_are_binary(sample):
    item = ms_datalist(sample, "test")[0]
    vol = LoadMSFlaird()(item)
    assert vol["image"].shape == (1, 48, 48, 8) and vol["label"].shape == (1, 48, 48, 8)
    assert float(vol["image"].min()) == 0.0 and float(vol["image"].max()) == 1.0
    assert set(torch.unique(vol["label"]).tolist()) == {0.0, 1.0}
    sl = LoadMSFlaird()({**item, "slice": 4})
    assert sl["image"].shape == (1, 48, 48)
    assert torch.equal(sl["image"], vol["image"][..., 4]) and torch.equal(sl["label"], vol["label"][..., 4])
    np.testing.assert_allclose(np.asarray(vol["image"].affine), np.asarray(nib.load(item["image"]).affine))
    # the inference path (PreprocessFlaird after LoadImaged) gives the same intensities
    from monai.transforms import LoadImaged

    inf = PreprocessFlaird("image")(LoadImaged("image", image_only=True, ensure_channel_first=True)(item))
    torch.testing.assert_close(torch.as_tensor(inf["image"]), torch.as_tensor(vol["image"]))


def test_preprocessing_is_in_plane_unsharp_mask_then_percentile_scaling():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((1, 24, 20, 3)).astype(np.float32))
    out = flair_preprocessing()(x)
    per_slice = [flair_preprocessing(percentiles=(0, 100))(x[..., k]) for k in range(3)]
    assert out.shape == x.shape and float(out.min()) == 0.0 and float(out.max()) == 1.0
    # sharpening is per slice: a volume's slice equals the slice processed alone, up to the scaling
    for k in range(3):
        a = out[..., k].flatten()
        b = torch.as_tensor(per_slice[k]).flatten()
        inside = (a > 0) & (a < 1)
        corr = np.corrcoef(a[inside].numpy(), b[inside].numpy())[0, 1]
        assert corr > 0.999
    # a constant image is left constant by the sharpening (it only amplifies detail), away from the
    # border, where MONAI's Gaussian pads with zeros (FLAIR borders are background anyway)
    flat = torch.full((1, 32, 32, 2), 7.0)
    sharp = torch.as_tensor(flair_preprocessing().transforms[0](flat))
    torch.testing.assert_close(sharp[:, 6:-6, 6:-6], flat[:, 6:-6, 6:-6], atol=1e-3, rtol=0)
    # unsharp masking: an edge gets overshoot on both sides
    step = torch.zeros(1, 16, 16)
    step[:, :, 8:] = 1.0
    s = torch.as_tensor(flair_preprocessing().transforms[0](step))
    assert s[0, 8, 7] < 0 and s[0, 8, 8] > 1


@pytest.mark.parametrize("problem", ["shape", "nan", "2d", "4d", "corrupt"])
def test_loader_rejects_bad_input_naming_the_file(tmp_path, problem):
    img = np.ones((16, 16, 4), np.float32)
    lab = np.zeros((16, 16, 4), np.uint8)
    if problem == "shape":
        lab = np.zeros((16, 16, 5), np.uint8)
    elif problem == "nan":
        img[3, 3, 1] = np.nan
    elif problem == "2d":
        img, lab = img[..., 0], lab[..., 0]
    elif problem == "4d":
        img, lab = img[..., None].repeat(2, -1), lab[..., None].repeat(2, -1)
    ip, lp = str(tmp_path / "Patient-1" / "1-Flair.nii.gz"), str(tmp_path / "Patient-1" / "1-LesionSeg-Flair.nii.gz")
    _save(ip, img)
    _save(lp, lab)
    if problem == "corrupt":
        with gzip.open(ip, "rb") as f:
            raw = f.read()
        with gzip.open(ip, "wb") as f:
            f.write(raw[: len(raw) // 3])
    expected = {"shape": "mask shape", "nan": "NaN or infinite", "2d": "expected a 3D", "4d": "expected a 3D",
                "corrupt": "cannot read"}[problem]
    with pytest.raises(ValueError, match=expected) as err:
        LoadMSFlaird()({"image": ip, "label": lp})
    assert "1-Flair.nii.gz" in str(err.value)


def _run_eval_metrics(pairs, tmp_path):
    """Run the evaluate.json metric handlers and the report over (pred, label) binary masks."""
    def step(engine, batch):
        pred, label = batch
        onehot = lambda m: torch.stack([1 - m, m])[None].float()  # noqa: E731
        return [{"pred": onehot(pred)[0], "label": onehot(label)[0]}]

    engine = Engine(step)
    ot = from_engine(["pred", "label"])
    # as evaluate.json: Dice and IoU with MONAI's ignore_empty=False (an empty label and prediction agree)
    IgniteMetricHandler(DiceMetric(include_background=False, ignore_empty=False), output_transform=ot).attach(engine, "val_mean_dice")
    IgniteMetricHandler(MeanIoU(include_background=False, ignore_empty=False), output_transform=ot).attach(engine, "val_iou")
    HausdorffDistance(include_background=False, percentile=95, output_transform=ot).attach(engine, "val_hd95")
    ConfusionMatrix(include_background=False, metric_name="sensitivity", output_transform=ot).attach(engine, "val_sens")
    ConfusionMatrix(include_background=False, metric_name="specificity", output_transform=ot).attach(engine, "val_spec")
    SegmentationReport(str(tmp_path), ["val_iou", "val_mean_dice", "val_hd95", "val_sens", "val_spec"], ["lesion"],
                       confusion_metrics={"val_sens": "sensitivity", "val_spec": "specificity"}).attach(engine)
    engine.run([(torch.as_tensor(p), torch.as_tensor(l)) for p, l in pairs])
    with open(tmp_path / "metrics.json") as f:
        return json.load(f)


def test_lesion_metrics_against_hand_computed_masks_and_empty_cases(tmp_path):
    shape = (10, 10, 4)
    label = np.zeros(shape, np.float32)
    label[2:6, 2:6, 1] = 1  # 16 voxels
    pred = np.zeros(shape, np.float32)
    pred[2:6, 4:8, 1] = 1  # 16 voxels, 8 overlap
    empty = np.zeros(shape, np.float32)
    report = _run_eval_metrics([(pred, label), (empty, empty), (pred, empty), (empty, label)], tmp_path)
    rows = report["per_volume"]
    # case 1 by hand: TP 8, FP 8, FN 8, TN 400 - 24 = 376
    assert rows[0]["val_mean_dice_lesion"] == pytest.approx(2 * 8 / 32)
    assert rows[0]["val_iou_lesion"] == pytest.approx(8 / 24)
    assert rows[0]["val_sens_lesion"] == pytest.approx(8 / 16)
    assert rows[0]["val_spec_lesion"] == pytest.approx(376 / 384)
    # HD95 by hand: surface voxels 2 apart along x at worst; MONAI's 95th percentile of both directions
    assert rows[0]["val_hd95_lesion"] == pytest.approx(2.0)
    # both empty: Dice and IoU 1 (MONAI ignore_empty=False), HD95 and sensitivity undefined, specificity 1
    assert rows[1]["val_mean_dice_lesion"] == 1.0 and rows[1]["val_iou_lesion"] == 1.0
    assert math.isnan(rows[1]["val_hd95_lesion"]) and math.isnan(rows[1]["val_sens_lesion"])
    assert rows[1]["val_spec_lesion"] == 1.0
    # false positives on a lesion-free volume: Dice/IoU 0, HD95 undefined; missed lesions: Dice 0, sensitivity 0
    assert rows[2]["val_mean_dice_lesion"] == 0.0 and math.isnan(rows[2]["val_hd95_lesion"])
    assert rows[3]["val_mean_dice_lesion"] == 0.0 and rows[3]["val_sens_lesion"] == 0.0
    summary = {(s["metric"], s["class"]): s for s in report["summary"]}
    assert summary[("val_mean_dice", "lesion")]["mean"] == pytest.approx((0.5 + 1 + 0 + 0) / 4)
    assert summary[("val_hd95", "lesion")]["n"] == 1  # undefined values are left out of the mean


def test_lesion_count_and_volume():
    m = np.zeros((20, 20, 6), np.uint8)
    m[2:4, 2:4, 1:3] = 1  # 8 voxels
    m[4, 4, 3] = 1  # touches the first only diagonally: the same lesion with 26-connectivity
    m[10:15, 10:12, 2] = 1  # 10 voxels
    m[18, 18, 5] = 1  # 1 voxel
    stats = lesion_stats(m, voxel_volume_mm3=2.0)
    assert stats == {"lesion_count": 3, "lesion_volume_ml": 20 * 2.0 / 1000, "largest_lesion_ml": 10 * 2.0 / 1000}
    stats = lesion_stats(m, voxel_volume_mm3=2.0, min_lesion_mm3=4.0)
    assert stats["lesion_count"] == 2 and stats["lesion_volume_ml"] == pytest.approx(0.04)
    assert lesion_stats(np.zeros((4, 4, 4)), 1.0) == {"lesion_count": 0, "lesion_volume_ml": 0.0,
                                                      "largest_lesion_ml": 0.0}


def test_lesion_report_uses_the_affine_and_keeps_same_named_cases_apart(tmp_path):
    root = tmp_path / "data"
    outputs = []
    for pid, n in (("001", 1), ("002", 2)):
        m = torch.zeros(1, 12, 12, 4)
        for k in range(n):
            m[0, 1 + 5 * k : 3 + 5 * k, 1:3, 1] = 1
        src = str(root / pid / "flair_time02_on_middle_space.nii.gz")
        outputs.append({"pred": MetaTensor(m, affine=torch.diag(torch.tensor([0.5, 0.5, 2.0, 1.0])),
                                           meta={"filename_or_obj": src})})
    engine = Engine(lambda e, b: [b])
    LesionReport(str(tmp_path / "out"), data_root_dir=str(root)).attach(engine)
    engine.run(outputs)
    with open(tmp_path / "out" / "lesions.json") as f:
        rows = json.load(f)["cases"]
    assert [r["case"] for r in rows] == ["001/flair_time02_on_middle_space", "002/flair_time02_on_middle_space"]
    assert [r["lesion_count"] for r in rows] == [1, 2]
    assert rows[1]["lesion_volume_ml"] == pytest.approx(8 * 0.5 / 1000)
    assert os.path.isfile(tmp_path / "out" / "lesions.csv")


# ---------------------------------------------------------------- foreground oversampling


def test_slices_with_foreground_reads_each_label_once(tmp_path):
    from common.data import slices_with_foreground

    lab = np.zeros((6, 6, 4), np.uint8)
    lab[2, 3, 1] = 1
    lab[0, 0, 3] = 1
    path = str(tmp_path / "mask.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), path)
    items = [{"image": path, "label": path, "slice": k} for k in range(4)]
    assert slices_with_foreground(items) == [False, True, False, True]
    with pytest.raises(ValueError, match="missing.nii.gz: cannot read the label"):
        slices_with_foreground([{"label": str(tmp_path / "missing.nii.gz"), "slice": 0}])


def test_foreground_oversampler_puts_foreground_in_every_batch():
    from common.data import ForegroundOversampler

    fg = [i % 10 == 0 for i in range(100)]  # 10 % of the slices hold foreground
    s = ForegroundOversampler(fg, batch_size=4, fraction=0.33, seed=3)
    idx = list(s)
    assert len(s) == len(idx) == 100
    batches = [idx[i:i + 4] for i in range(0, 100, 4)]
    assert all(fg[b[-1]] for b in batches)  # round(0.33 * 4) = 1 forced foreground slice, the last
    assert len(set(i for b in batches for i in b[:3])) == 75  # the rest: a permutation, no repeats
    assert list(ForegroundOversampler(fg, 4, 0.33, seed=3)) == idx  # deterministic per seed
    # plain shuffling without oversampling or foreground
    assert sorted(ForegroundOversampler(fg, 4, 0.0, seed=1)) == list(range(100))
    assert sorted(ForegroundOversampler([False] * 8, 4, 0.5)) == list(range(8))
    # replicas split the epoch and draw different streams
    r0, r1 = (list(ForegroundOversampler(fg, 4, 0.33, seed=3, num_replicas=2, rank=r)) for r in (0, 1))
    assert len(r0) == len(r1) == 50 and r0 != r1
    with pytest.raises(ValueError, match="fraction must be in"):
        ForegroundOversampler(fg, 4, 1.5)
