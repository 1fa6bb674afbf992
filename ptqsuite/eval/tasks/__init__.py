"""lm-eval's zero-shot tasks on the vendored data: the shipped task configs and the datasets they read.

Each ``<task>.yaml`` here is lm-eval's own config (prompt, target, choices, metrics, its own Python functions
such as hellaswag's ``process_docs``) with only the data source changed: ``dataset_path: json`` and, filled in
at run time by :func:`config`, ``data_files`` = the absolute path of the vendored file, decompressed once into
the ptqsuite cache (relative ``data_files`` would resolve against the working directory). Nothing is
downloaded. Task names carry a ``ptq_`` prefix so they can never shadow lm-eval's registered tasks; results
are reported under the plain names.

Format conversions, done when the file is materialized; every example, its order and its answer are kept:

* arc_easy, arc_challenge: the vendored files are in OLMES form ``{id, question, choices: [text], gold}``;
  lm-eval reads HF ai2_arc's ``{choices: {text, label}, answerKey}``, so labels A, B, C, ... are made up (the
  originals, sometimes 1/2/3/4, were not kept) and ``answerKey`` is the gold choice's label. lm-eval only uses
  the label to find the gold index, so prompts and scores are unaffected.
* boolq: the vendored file has the original BoolQ ``answer`` (a bool); lm-eval's super_glue config reads
  ``label``: ``label = int(answer)`` (0 = "no", 1 = "yes", as in super_glue).

Deviation: openbookqa scores the validation split (lm-eval: test, which is not vendored).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import lzma
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from ptqsuite.paths import ASSETS, atomic_write_text, cache_dir

TASKS_DIR = Path(__file__).parent
PREFIX = "ptq_"


def _arc(doc: dict) -> dict:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], "question": doc["question"], "choices": {"text": doc["choices"], "label": labels},
            "answerKey": labels[doc["gold"]]}


def _boolq(doc: dict) -> dict:
    return doc | {"label": int(doc["answer"])}


@dataclass(frozen=True)
class TaskData:
    vendored: str  # file in ptqsuite/assets/data
    split: str  # the split lm-eval scores (the name our config gives the one data file)
    convert: Callable[[dict], dict] | None = None  # per-row format conversion, None: the file as vendored


DATA = {
    "piqa": TaskData("piqa.validation.jsonl.xz", "validation"),
    "arc_easy": TaskData("arc_easy.test.jsonl.xz", "test", _arc),
    "arc_challenge": TaskData("arc_challenge.test.jsonl.xz", "test", _arc),
    "hellaswag": TaskData("hellaswag.validation.jsonl.xz", "validation"),
    "winogrande": TaskData("winogrande.validation.jsonl.xz", "validation"),
    "lambada_openai": TaskData("lambada_openai.test.jsonl.xz", "test"),
    "boolq": TaskData("boolq.validation.jsonl.xz", "validation", _boolq),
    "openbookqa": TaskData("openbookqa.validation.jsonl.xz", "validation"),
}
TASKS: tuple[str, ...] = tuple(DATA)


def check(name: str) -> None:
    if name not in DATA:
        raise ValueError(f"unknown zero-shot task {name!r}; valid: {', '.join(TASKS)}")


@functools.cache
def _jsonl(name: str) -> str:
    """The task's rows as lm-eval will read them: the vendored bytes, converted where the schema differs."""
    data = DATA[name]
    text = lzma.decompress((ASSETS / "data" / data.vendored).read_bytes()).decode("utf-8")
    if data.convert is None:
        return text
    rows = (data.convert(json.loads(line)) for line in text.splitlines())
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def size(name: str) -> int:
    """Number of examples in the scored split."""
    check(name)
    return _jsonl(name).count("\n")


@functools.cache
def _digest(name: str) -> str:
    return hashlib.sha256(_jsonl(name).encode("utf-8")).hexdigest()[:16]


def data_file(name: str) -> Path:
    """The decompressed (and converted) jsonl in the cache, written once.

    The content hash is in the file name, so a changed file or conversion gets a new name rather than
    overwriting one that another process may be reading. The write is atomic: concurrent workers that both
    find it missing each write the same bytes and the last rename wins.
    """
    check(name)
    path = cache_dir() / "lmeval-data" / f"{name}.{DATA[name].split}.{_digest(name)}.jsonl"
    if not path.exists():
        atomic_write_text(path, _jsonl(name))
    return path


def yaml_path(name: str) -> Path:
    check(name)
    return TASKS_DIR / f"{name}.yaml"


class _Loader(yaml.SafeLoader):
    """YAML with lm-eval's ``!function`` tag. Ours always name an importable module (lm-eval's own task code), so
    this needs none of lm-eval's private YAML machinery, whose home moves between lm-eval versions."""


def _function(loader: yaml.Loader, node: yaml.Node):
    module, _, attr = loader.construct_scalar(node).rpartition(".")
    return getattr(importlib.import_module(module), attr)


_Loader.add_constructor("!function", _function)


def load_config(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)  # noqa: S506 (a SafeLoader plus one tag)


def config(name: str) -> dict:
    """The task config for ``simple_evaluate(tasks=[...])``: the shipped YAML, its ``!function``s resolved to
    lm-eval's functions, with ``data_files`` pointing at :func:`data_file`."""
    cfg = load_config(yaml_path(name))
    cfg["dataset_kwargs"] = {"data_files": {DATA[name].split: str(data_file(name))}}
    return cfg
