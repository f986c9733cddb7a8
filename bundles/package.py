"""Package the bundles as self-contained MONAI bundle archives; bump versions; verify checksums.

``python -m bundles.package build`` writes, for every bundle, ``<name>_v<version>.zip`` under
``dist/bundles/`` (or ``--out``): the bundle folder (configs, docs, models' README, large_files.yml)
plus the modules of ``common/`` that its configs reach (followed through Python imports), so that
``python -m monai.bundle download --name <name> --url <archive>`` and then
``python -m monai.bundle run inference --bundle_root <dir>/<name> ...`` work in an environment with
only the declared pip packages. It also writes the collection index ``model_info.json`` beside the
archives, in the shape of MONAI model-zoo's (``"<name>_v<version>": {"checksum": sha1, "source":
url}``, plus name, version and description), and, with ``--update-index``, ``bundles/model_info.json``.

Weights are never inside an archive. ``--weights <name>=<model.pt>`` copies a trained checkpoint
beside the archives as ``<name>_v<version>_model.pt`` and lists it, with its URL (``--base-url``) and
SHA-256, in the archive's ``large_files.yml``: ``python -m monai.bundle download_large_files
--bundle_path <dir>/<name>`` fetches and checks it.

Archives are reproducible: sorted entries, fixed timestamps and permissions, so the same tree gives
the same bytes and the same checksum.

``python -m bundles.package bump <name> --part minor --message "..."`` raises the version in the
bundle's metadata.json and adds the changelog entry. ``python -m bundles.package verify --index
model_info.json <archive>...`` checks archives against the index.

Bundles carry their code in ``common/`` at the bundle root. MONAI puts the bundle root on
``sys.path`` only when a workflow's ``run`` starts, after ``initialize`` has resolved the config's
imports, so the packaged configs run their ``initialize`` steps (renamed ``setup``) as the first
step of ``run``.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script or module from anywhere
    sys.path.insert(0, REPO)
from common.bundle_run import BUNDLES  # noqa: E402

__all__ = [
    "BUNDLE_NAMES",
    "build",
    "build_archive",
    "bump_version",
    "code_modules",
    "relocatable_config",
    "sha1sum",
    "sha256sum",
    "verify",
]

BUNDLE_NAMES = tuple(BUNDLES)
INDEX = os.path.join(REPO, "bundles", "model_info.json")
# files of common/ that are not Python modules but are needed at run time (pyproject package-data)
PACKAGE_DATA = {"common/ops": ("csrc",)}
# bundle-folder entries that are run outputs, never packaged
EXCLUDE = ("sample_data", "eval", "runs", "mlruns", "__pycache__", ".gitignore")
_FIXED_TIME = (2020, 1, 1, 0, 0, 0)
_COMMON_REF = re.compile(r"\bcommon(?:\.[A-Za-z_]\w*)+")
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


class PackagingError(RuntimeError):
    """A bundle cannot be packaged as asked (the message names the file and the problem)."""


def sha1sum(path: str) -> str:
    """SHA-1 of a file (model-zoo's model_info.json checksum)."""
    return _digest(path, hashlib.sha1())


def sha256sum(path: str) -> str:
    return _digest(path, hashlib.sha256())


def _digest(path: str, h) -> str:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PackagingError(f"{path}: cannot read JSON ({e})") from e


def _write_atomic(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- code closure
def _module_file(module: str) -> str | None:
    """The file of a ``common...`` module (package ``__init__.py`` or ``.py``), or None."""
    base = os.path.join(REPO, *module.split("."))
    if os.path.isfile(os.path.join(base, "__init__.py")):
        return os.path.join(base, "__init__.py")
    if os.path.isfile(base + ".py"):
        return base + ".py"
    return None


def _longest_module(dotted: str) -> str | None:
    """``common.data.acdc_datalist`` -> ``common.data`` (the longest prefix that is a module)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if _module_file(".".join(parts[:n])):
            return ".".join(parts[:n])
    return None


def _imports_of(path: str, module: str) -> set[str]:
    """Modules of ``common`` a file imports anywhere (lazy imports in functions, module names in strings)."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from . import x` imports module x
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _COMMON_REF.fullmatch(node.value):
            found.add(node.value)  # importlib.import_module("common....") (the lazily loaded GPU backends)
    return {m for m in (_longest_module(f) for f in found if f.split(".")[0] == "common") if m}


def code_modules(bundle: str) -> list[str]:
    """Files of ``common/`` (relative to the repository) that the bundle's configs need, with
    every parent package's ``__init__.py`` and the package data (the C source of the CPU scan)."""
    config_dir = os.path.join(REPO, bundle, "configs")
    todo: set[str] = set()
    for name in sorted(os.listdir(config_dir)):
        if name.endswith(".json"):
            with open(os.path.join(config_dir, name)) as f:
                todo.update(m for m in (_longest_module(r) for r in _COMMON_REF.findall(f.read())) if m)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo.update(".".join(parts[:n]) for n in range(1, len(parts)))  # parent packages
        todo.update(_imports_of(_module_file(module), module) - seen)
    files = {os.path.relpath(_module_file(m), REPO) for m in seen}
    for pkg, folders in PACKAGE_DATA.items():
        if any(f.startswith(pkg + os.sep) for f in files):
            for folder in folders:
                for base, _, names in os.walk(os.path.join(REPO, pkg, folder)):
                    files.update(os.path.relpath(os.path.join(base, n), REPO) for n in names)
    return sorted(files)


# ------------------------------------------------------------------------------------ configs
def relocatable_config(config: dict) -> dict:
    """The config with its ``initialize`` steps run first inside ``run`` (as ``setup``).

    MONAI adds the bundle root to ``sys.path`` when ``run`` starts; a config whose ``initialize``
    already resolves expressions would import ``common`` before that, from wherever the user
    stands. Configs merged on top of each other (train + evaluate, train + multi-GPU) are
    transformed alike, so overrides of ``initialize`` and ``run`` keep working."""
    out = copy.deepcopy(config)
    if "initialize" in out:
        out["setup"] = out.pop("initialize")
        if "run" in out:
            run = out["run"] if isinstance(out["run"], list) else [out["run"]]
            out["run"] = ["$@setup", *run]
    return out


def _bundle_files(bundle: str) -> list[str]:
    root = os.path.join(REPO, bundle)
    if not os.path.isfile(os.path.join(root, "configs", "metadata.json")):
        raise PackagingError(f"{root}: not a bundle (no configs/metadata.json)")
    files = []
    for base, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDE)
        rel = os.path.relpath(base, root)
        for n in sorted(names):
            if n in EXCLUDE or n.endswith((".pt", ".pth", ".ts", ".onnx", ".pyc")) or n.startswith("large_files"):
                continue
            files.append(os.path.normpath(os.path.join(rel, n)))
    return files


def _zip_add(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=_FIXED_TIME)
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


def large_files_yaml(entries: Sequence[dict]) -> str:
    """``large_files.yml`` as MONAI's ``download_large_files`` reads it."""
    lines = ["# Large files of this bundle, fetched by: python -m monai.bundle download_large_files --bundle_path .",
             "# Written by bundles/package.py. Weights are never committed to the repository or put in the archive."]
    if not entries:
        return "\n".join(lines + ["# No trained weights are published for this version: train the bundle first.",
                                  "large_files: []", ""])
    lines.append("large_files:")
    for e in entries:
        lines += [f'  - path: "{e["path"]}"', f'    url: "{e["url"]}"', f'    hash_val: "{e["hash_val"]}"',
                  f'    hash_type: "{e["hash_type"]}"']
    return "\n".join(lines + [""])


def build_archive(bundle: str, out_dir: str, weights: str | None = None, base_url: str = "") -> dict:
    """Write ``<bundle>_v<version>.zip`` (and the weights beside it) into ``out_dir``; its index entry."""
    meta = _read_json(os.path.join(REPO, bundle, "configs", "metadata.json"))
    version = meta.get("version")
    if not isinstance(version, str) or not _VERSION.match(version):
        raise PackagingError(f"{bundle}/configs/metadata.json: version {version!r} is not MAJOR.MINOR.PATCH")
    if version not in meta.get("changelog", {}):
        raise PackagingError(f"{bundle}/configs/metadata.json: no changelog entry for version {version}")
    key = f"{bundle}_v{version}"
    os.makedirs(out_dir, exist_ok=True)
    large = []
    if weights:
        if not os.path.isfile(weights):
            raise PackagingError(f"{weights}: weights file not found (for {bundle})")
        wname = f"{key}_model.pt"
        shutil.copyfile(weights, os.path.join(out_dir, wname + ".tmp"))
        os.replace(os.path.join(out_dir, wname + ".tmp"), os.path.join(out_dir, wname))
        large.append({"path": "models/model.pt", "url": _join_url(base_url, wname),
                      "hash_val": sha256sum(os.path.join(out_dir, wname)), "hash_type": "sha256"})
    archive = os.path.join(out_dir, f"{key}.zip")
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp_", suffix=".zip")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for rel in _bundle_files(bundle):
                path = os.path.join(REPO, bundle, rel)
                if rel.startswith("configs" + os.sep) and rel.endswith(".json") and rel != os.path.join(
                        "configs", "metadata.json"):
                    data = (json.dumps(relocatable_config(_read_json(path)), indent=4) + "\n").encode()
                else:
                    with open(path, "rb") as f:
                        data = f.read()
                _zip_add(zf, f"{bundle}/{rel.replace(os.sep, '/')}", data)
            _zip_add(zf, f"{bundle}/large_files.yml", large_files_yaml(large).encode())
            for rel in code_modules(bundle):
                with open(os.path.join(REPO, rel), "rb") as f:
                    _zip_add(zf, f"{bundle}/{rel.replace(os.sep, '/')}", f.read())
        os.chmod(tmp, 0o644)
        os.replace(tmp, archive)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {key: {"checksum": sha1sum(archive), "source": _join_url(base_url, os.path.basename(archive)),
                  "name": bundle, "version": version, "description": meta.get("name", bundle)}}


def _join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if base else name


def build(out_dir: str, bundles: Iterable[str] = BUNDLE_NAMES, weights: dict[str, str] | None = None,
          base_url: str = "", update_index: bool = False) -> dict:
    """Archives of ``bundles`` and the collection index ``model_info.json`` in ``out_dir``."""
    weights = dict(weights or {})
    unknown = set(weights) - set(bundles)
    if unknown:
        raise PackagingError(f"--weights for bundles not being built: {sorted(unknown)}")
    index: dict = {}
    for b in bundles:
        if b not in BUNDLE_NAMES:
            raise PackagingError(f"unknown bundle {b!r}; the collection has {list(BUNDLE_NAMES)}")
        index.update(build_archive(b, out_dir, weights.get(b), base_url))
    _write_atomic(os.path.join(out_dir, "model_info.json"), json.dumps(index, indent=4) + "\n")
    if update_index:
        old = _read_json(INDEX) if os.path.isfile(INDEX) else {}
        old.update(index)
        _write_atomic(INDEX, json.dumps(dict(sorted(old.items())), indent=4) + "\n")
    return index


def verify(index_path: str, archives: Sequence[str]) -> list[str]:
    """Problems (empty when all is well) of archives against an index: known name, same SHA-1."""
    index = _read_json(index_path)
    problems = []
    for a in archives:
        key = os.path.basename(a)[: -len(".zip")] if a.endswith(".zip") else os.path.basename(a)
        if key not in index:
            problems.append(f"{a}: {key} is not in {index_path}")
        elif (digest := sha1sum(a)) != index[key]["checksum"]:
            problems.append(f"{a}: SHA-1 {digest} differs from the index's {index[key]['checksum']}")
    return problems


# ------------------------------------------------------------------------------------- versions
def bump_version(bundle: str, part: str, message: str) -> str:
    """Raise the bundle's version (``major`` / ``minor`` / ``patch``) with a changelog entry."""
    if part not in ("major", "minor", "patch"):
        raise PackagingError(f"part must be major, minor or patch, got {part!r}")
    if not message.strip():
        raise PackagingError("a changelog message is required")
    path = os.path.join(REPO, bundle, "configs", "metadata.json")
    meta = _read_json(path)
    m = _VERSION.match(str(meta.get("version", "")))
    if not m:
        raise PackagingError(f"{path}: version {meta.get('version')!r} is not MAJOR.MINOR.PATCH")
    major, minor, patch = (int(x) for x in m.groups())
    new = {"major": f"{major + 1}.0.0", "minor": f"{major}.{minor + 1}.0",
           "patch": f"{major}.{minor}.{patch + 1}"}[part]
    meta["version"] = new
    meta["changelog"] = {new: message.strip(), **meta.get("changelog", {})}
    _write_atomic(path, json.dumps(meta, indent=4) + "\n")
    return new


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bundles.package", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the archives and model_info.json")
    b.add_argument("--out", default=os.path.join(REPO, "dist", "bundles"))
    b.add_argument("--bundles", nargs="+", default=list(BUNDLE_NAMES), choices=BUNDLE_NAMES)
    b.add_argument("--base-url", default="", help="where the archives and weights will be served from")
    b.add_argument("--weights", nargs="*", default=[], metavar="NAME=PATH", help="trained checkpoints to publish")
    b.add_argument("--update-index", action="store_true", help="also merge the entries into bundles/model_info.json")
    u = sub.add_parser("bump", help="raise a bundle's version, with a changelog entry")
    u.add_argument("bundle", choices=BUNDLE_NAMES)
    u.add_argument("--part", default="patch", choices=["major", "minor", "patch"])
    u.add_argument("--message", required=True)
    v = sub.add_parser("verify", help="check archives against an index")
    v.add_argument("--index", default=INDEX)
    v.add_argument("archives", nargs="+")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            weights = {}
            for item in args.weights:
                name, sep, path = item.partition("=")
                if not sep:
                    raise PackagingError(f"--weights takes NAME=PATH, got {item!r}")
                weights[name] = path
            index = build(args.out, args.bundles, weights, args.base_url, args.update_index)
            for key, entry in index.items():
                print(f"{key}: {os.path.join(args.out, key + '.zip')} sha1 {entry['checksum']}")
        elif args.cmd == "bump":
            print(f"{args.bundle}: version {bump_version(args.bundle, args.part, args.message)}")
        else:
            problems = verify(args.index, args.archives)
            for p in problems:
                print(p, file=sys.stderr)
            if problems:
                return 1
            print(f"{len(args.archives)} archive(s) match {args.index}")
    except PackagingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
