"""bundles/package.py: self-contained archives, served over HTTP, downloaded and run by the MONAI CLI
in a Python environment that has this environment's packages but not this repository."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import venv
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, download, download_large_files

from bundles import package
from common.bundle_run import REPO

SIZE = 64  # a size every network takes (MSSMamba's token grid is fixed by its image size)
# one sample volume per bundle, found in the repository's sample data as the bundle's inference config finds it
SAMPLE = {
    "msvmunet_acdc": ("ensure_acdc_sample", os.path.join("nifti", "testing")),
    "mssmamba_synapse": ("ensure_synapse_sample", os.path.join("nifti", "img")),
    "mambahunet_ms": ("ensure_ms_sample", ""),
}


def one_volume(name: str, tmp) -> str:
    """A folder holding one sample image of the bundle (in a patient folder), for a quick inference."""
    import common.data

    ensure, sub = SAMPLE[name]
    sample = tmp / f"sample_{name}"
    getattr(common.data, ensure)(str(sample))
    if name == "mambahunet_ms":
        first = common.data.find_flair_images(str(sample))[0]
    else:
        first = sorted(p for p in (sample / sub).rglob("*.nii.gz") if "_gt." not in p.name)[0]
    dst = tmp / f"input_{name}" / "case"
    dst.mkdir(parents=True)
    shutil.copy(first, dst / os.path.basename(first))
    return str(dst.parent)


@pytest.fixture(scope="module")
def served(module_tmp):
    """The three archives (with freshly initialised weights) served from 127.0.0.1."""
    tmp = module_tmp("dist")
    dist = tmp / "dist"
    dist.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(dist))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    weights = {}
    for name in package.BUNDLE_NAMES:
        parser = ConfigParser()
        parser.read_config(os.path.join(REPO, name, "configs", "inference.json"))
        parser["image_size"] = SIZE
        torch.manual_seed(0)
        net = parser.get_parsed_content("network_def")
        weights[name] = str(tmp / f"{name}.pt")
        torch.save(net.state_dict(), weights[name])
    index = package.build(str(dist), weights=weights, base_url=url)
    try:
        yield dist, url, index
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def isolated_python(module_tmp):
    """A fresh virtual environment that sees this environment's site-packages but not this repository
    (the editable install of the repository is a .pth hook, which a path listed in a .pth file does
    not run)."""
    root = module_tmp("venv")
    venv.create(root / "venv", with_pip=False)
    python = str(root / "venv" / ("Scripts" if os.name == "nt" else "bin") / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    with open(os.path.join(purelib, "_this_env.pth"), "w") as f:
        f.write("\n".join(paths) + "\n")
    res = subprocess.run([python, "-c", "import common"], cwd=str(root), capture_output=True, text=True)
    assert res.returncode != 0 and "No module named 'common'" in res.stderr  # the repository is out of reach
    res = subprocess.run([python, "-c", "import nibabel"], cwd=str(root), capture_output=True, text=True)  # site-packages
    assert res.returncode == 0, res.stderr
    return python


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_archives_are_reproducible_and_hold_the_code_they_need(tmp_path):
    a = package.build(str(tmp_path / "a"))
    b = package.build(str(tmp_path / "b"))
    assert a == b  # same tree, same bytes
    for key, entry in a.items():
        name, version = entry["name"], entry["version"]
        assert key == f"{name}_v{version}" and entry["source"] == f"{key}.zip"
        with open(os.path.join(REPO, name, "configs", "metadata.json")) as f:
            assert json.load(f)["version"] == version
        with zipfile.ZipFile(tmp_path / "a" / f"{key}.zip") as zf:
            names = set(zf.namelist())
            assert all(n.startswith(f"{name}/") for n in names)  # one base folder, as MONAI extracts it
            assert {f"{name}/configs/inference.json", f"{name}/configs/metadata.json", f"{name}/large_files.yml",
                    f"{name}/common/ops/csrc/selective_scan_cpu.c", f"{name}/common/ops/scan_triton.py",
                    f"{name}/docs/README.md"} <= names
            assert not any(n.endswith((".pt", ".pyc")) or "/sample_data/" in n for n in names)
            net_module = {"msvmunet_acdc": "msvmunet", "mssmamba_synapse": "mssmamba", "mambahunet_ms": "mambahunet"}
            assert f"{name}/common/networks/{net_module[name]}.py" in names
            others = set(net_module.values()) - {net_module[name]}
            assert not any(f"{name}/common/networks/{o}.py" in names for o in others)  # only what it needs
            cfg = json.loads(zf.read(f"{name}/configs/inference.json"))
            assert "initialize" not in cfg and cfg["run"][0] == "$@setup"
    assert package.verify(str(tmp_path / "a" / "model_info.json"), [str(tmp_path / "a" / f"{k}.zip") for k in a]) == []
    bad = tmp_path / "a" / f"{next(iter(a))}.zip"
    with open(bad, "ab") as f:
        f.write(b"tampered")
    assert "differs from the index" in package.verify(str(tmp_path / "a" / "model_info.json"), [str(bad)])[0]


def test_relocatable_config_keeps_merge_order():
    train = {"initialize": ["$a()"], "run": ["$b()"], "training": "@run"}
    evaluate = {"initialize": ["$c()"], "run": ["$d()"]}
    merged = {**package.relocatable_config(train), **package.relocatable_config(evaluate)}
    assert merged == {"setup": ["$c()"], "run": ["$@setup", "$d()"], "training": "@run"}


def test_bump_version_and_committed_index(tmp_path, monkeypatch):
    bundle = tmp_path / "msvmunet_acdc" / "configs"
    bundle.mkdir(parents=True)
    meta = {"version": "0.1.0", "changelog": {"0.1.0": "first"}}
    (bundle / "metadata.json").write_text(json.dumps(meta))
    monkeypatch.setattr(package, "REPO", str(tmp_path))
    assert package.bump_version("msvmunet_acdc", "minor", "packaged archives") == "0.2.0"
    new = json.loads((bundle / "metadata.json").read_text())
    assert new["version"] == "0.2.0" and list(new["changelog"]) == ["0.2.0", "0.1.0"]
    assert package.bump_version("msvmunet_acdc", "patch", "fix") == "0.2.1"
    with pytest.raises(package.PackagingError, match="changelog message"):
        package.bump_version("msvmunet_acdc", "patch", " ")
    monkeypatch.undo()
    # the committed index lists every bundle at its current version
    with open(package.INDEX) as f:
        index = json.load(f)
    for name in package.BUNDLE_NAMES:
        with open(os.path.join(REPO, name, "configs", "metadata.json")) as f:
            version = json.load(f)["version"]
        assert f"{name}_v{version}" in index, f"bundles/model_info.json lacks {name} {version}: run bundles/package.py"


def test_cli_errors_are_clear(tmp_path, capsys):
    assert package.main(["build", "--out", str(tmp_path), "--bundles", "msvmunet_acdc",
                         "--weights", "msvmunet_acdc=/nonexistent/model.pt"]) == 2
    assert "/nonexistent/model.pt: weights file not found" in capsys.readouterr().err
    assert package.main(["build", "--out", str(tmp_path), "--weights", "msvmunet_acdc"]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


@pytest.mark.parametrize("name", package.BUNDLE_NAMES)
def test_download_and_infer_without_the_repository(name, served, isolated_python, tmp_path):
    """``monai.bundle download --url`` from a local HTTP server, ``download_large_files`` (SHA-256
    checked), then ``monai.bundle run inference`` from another directory, in a Python that cannot
    import this repository: the bundle runs on the code it carries. The two downloads run the CLI's
    functions in this process (they import nothing from the bundle; each CLI process would spend ~12 s
    importing MONAI); the inference runs the CLI in the isolated Python."""
    dist, url, index = served
    key = next(k for k, e in index.items() if e["name"] == name)
    work = tmp_path / "elsewhere"
    work.mkdir()
    dl = tmp_path / "downloads"

    def cli(*args):
        res = subprocess.run([isolated_python, "-m", "monai.bundle", *args], cwd=str(work), env=_env(),
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout + res.stderr

    download(name=name, url=index[key]["source"], bundle_dir=str(dl), progress=False)
    assert package.sha1sum(str(dl / f"{name}.zip")) == index[key]["checksum"]
    root = dl / name
    assert not (root / "models" / "model.pt").exists()
    download_large_files(bundle_path=str(root))
    assert package.sha256sum(str(root / "models" / "model.pt")) == package.sha256sum(str(dist / f"{key}_model.pt"))
    out_dir = tmp_path / "predictions"
    inputs = one_volume(name, tmp_path)
    cli("run", "inference", "--dataset_dir", inputs, "--meta_file", str(root / "configs" / "metadata.json"),
        "--config_file", str(root / "configs" / "inference.json"), "--logging_file",
        str(root / "configs" / "logging.conf"), "--bundle_root", str(root), "--image_size", str(SIZE),
        "--output_dir", str(out_dir))
    preds = sorted(out_dir.rglob("*.nii.gz"))  # <case>_<output_postfix>.nii.gz
    src = next(p for p in (work.parent / f"input_{name}").rglob("*.nii.gz"))
    assert len(preds) == 1, f"expected one prediction under {out_dir}, got {preds}"
    pred, img = nib.load(preds[0]), nib.load(src)
    assert pred.shape == img.shape and np.allclose(pred.affine, img.affine)
    assert pred.get_data_dtype() == np.uint8 and int(np.asarray(pred.dataobj).max()) < 10


def test_committed_large_files_yml_is_valid_for_monai():
    import yaml

    for name in package.BUNDLE_NAMES:
        with open(os.path.join(REPO, name, "large_files.yml")) as f:
            content = yaml.safe_load(f)
        assert isinstance(content["large_files"], list)
        for entry in content["large_files"]:
            assert {"path", "url", "hash_val", "hash_type"} <= set(entry)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
