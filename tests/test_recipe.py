"""Recipe ids: readable, round-tripping, and strict about bad input."""
import json

import pytest

from dataclasses import replace

from ptqsuite.formats import FP8, MXFP4, NVFP4, IntFormat
from ptqsuite.formats.minifloat import E4M3
import torch

from ptqsuite.granularity import PerChannel, PerGroup, PerTensor, PerToken
from ptqsuite.recipe import Calibration, QuantSpec, Recipe, RecipeError, parse

IDS = ["rtn-w4g128", "rtn-w4g128sym", "rtn-w8", "rtn-w8pt", "rtn-w3sym", "rtn-w16", "rtn-w2g64@wikitext2.64x512.s3",
       "rtn-wfp8", "rtn-wfp8pt", "rtn-wfp8e5m2", "rtn-wmxfp4", "rtn-wmxfp8", "rtn-wnvfp4", "rtn-wmxfp4g16",
       "rtn-wmxfp4.ceil", "rtn-wmxfp4.e4m3.nearest", "rtn-wnvfp4g32.fp16", "rtn-wmxfp8pc", "rtn-wfp8g128",
       "gptq-w4g128", "gptq.act-w3@wikitext2.128x2048.s0", "gptq.act.par-w4sym", "clip+gptq+lrc16-w4g128",
       "clip5+rtn-wmxfp4", "lwc+rtn-w3g64", "lwc5+gptq-w2g64", "gptq+lrc-wnvfp4",
       "quarot+gptq-w4a4kv4", "awq+rtn-w4g128", "smooth+rtn-w8a8", "spinquant+gptq-w4a8", "smooth80+rtn-w8a8sym",
       "quarot1+rtn-w4g128a4g32kv4g16", "awq+clip+rtn-w4g128", "smooth+quarot+gptq.act-w4a8kv8",
       "rtn-w16a16kv16", "rtn-wnvfp4anvfp4", "rtn-wmxfp4amxfp4kvfp8", "rtn-w4afp8", "spinquant20+rtn-w4kv2",
       # issue 7: static (pt) activation and KV scales, KIVI (kv pc), layers kept more precise (.<linear><bits>)
       "rtn-w8a8pt", "rtn-w8a8ptsym", "rtn-w4afp8pt", "rtn-w16kvfp8pt", "rtn-w4a4kv2pc", "rtn-w4a4.down_proj8kv4",
       "rtn-w4a4sym.down_proj8.o_proj16", "quarot+rtn-wnvfp4anvfp4.e8m0.down_proj16kv4pc"]


@pytest.mark.parametrize("recipe_id", IDS)
def test_round_trip(recipe_id):
    r = parse(recipe_id)
    assert str(r) == recipe_id and parse(str(r)) == r
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_parsed_fields():
    assert parse("rtn-w4g128").weight == QuantSpec(IntFormat(4, symmetric=False), PerGroup(128))
    assert parse("rtn-w8sym").weight == QuantSpec(IntFormat(8, symmetric=True), PerChannel())
    assert parse("rtn-w8pt").weight.gran == PerTensor()
    assert parse("rtn-w16").weight.fmt is None and parse("rtn-w16").weight.bits == 16
    assert parse("rtn-w4@ptb.16x256.s1").calibration == Calibration("ptb", 16, 256, 1)
    assert parse("rtn-wmxfp4").weight == QuantSpec(MXFP4, PerGroup(32))
    assert parse("rtn-wnvfp4").weight == QuantSpec(NVFP4, PerGroup(16))
    assert parse("rtn-wfp8pt").weight == QuantSpec(FP8, PerTensor())
    assert parse("rtn-wmxfp4g64.e4m3.ceil").weight == QuantSpec(replace(MXFP4, scale=E4M3, rounding="ceil"),
                                                               PerGroup(64))
    assert parse("rtn-wmxfp4").weight.bits == 4 and parse("rtn-wfp8").weight.bits == 8
    r = parse("quarot+gptq-w4g128a8kv4g32")
    assert [str(t) for t in r.transforms] == ["quarot"] and r.method == "gptq"
    assert r.act == QuantSpec(IntFormat(8, scale_dtype=torch.float32), PerToken())
    assert r.kv == QuantSpec(IntFormat(4, scale_dtype=torch.float32), PerGroup(32))
    assert parse("rtn-w4").act is None and parse("rtn-w4a16").act == QuantSpec(None)
    assert parse("rtn-w4afp8").act == QuantSpec(FP8, PerToken())  # fp8's per-row preset is per token for inputs
    assert not parse("quarot+rtn-w4a4").needs_calibration and parse("smooth+rtn-w8a8").needs_calibration
    assert parse("rtn-w8a8pt").act.static and parse("rtn-w8a8pt").needs_calibration  # static scales calibrate
    assert parse("rtn-w4kv4pc").kv.gran == PerChannel() and not parse("rtn-w4kv4pc").needs_calibration
    kept = parse("rtn-w4a4sym.down_proj8.o_proj16").act
    assert kept.keep == (("down_proj", 8), ("o_proj", 16))
    assert kept.for_layer("down_proj") == QuantSpec(IntFormat(8, True, torch.float32), PerToken())
    assert kept.for_layer("o_proj") == QuantSpec(None) and kept.for_layer("q_proj").keep == ()
    assert parse("rtn-w4anvfp4.down_proj8").act.for_layer("down_proj") == QuantSpec(FP8, PerToken())


@pytest.mark.parametrize("redundant,canonical", [
    ("rtn-w4pc", "rtn-w4"), ("rtn-wmxfp4g32", "rtn-wmxfp4"), ("rtn-wmxfp4.e8m0.floor", "rtn-wmxfp4"),
    ("rtn-wfp8.e8m0.floor", "rtn-wmxfp8pc"), ("rtn-wnvfp4.e4m3", "rtn-wnvfp4"),
])
def test_equivalent_ids_print_one_canonical_form(redundant, canonical):
    assert str(parse(redundant)) == canonical and parse(canonical) == parse(redundant)


@pytest.mark.parametrize("bad,message", [
    ("gptqq-w4", r"unknown step 'gptqq'.*known methods: clip, gptq, lrc, lwc, rtn; known transforms"),
    ("rotate+rtn-w4", r"unknown step 'rotate'.*known transforms: awq, quarot, smooth, spinquant"),
    ("gptq+quarot-w4", r"transform 'quarot' .* comes after a mitigation step; transforms run first"),
    ("smooth101+rtn-w8a8", r"smooth's alpha must be 0..100, got 101"),
    ("awq3+rtn-w4", r"awq takes no number, got 3"),
    ("spinquant+gptq-w4", r"spinquant.*nothing in the loss is quantized.*add e.g. a8 or kv4"),
    ("rtn-w4a4pc", r"activation format 'a4pc'.*per-channel scales are not supported for activations; valid: per "
                   r"token \(the default\), g<n>, pt \(static, calibrated\)$"),
    ("rtn-w4amxfp4pt", r"'amxfp4pt'.*mxfp4 has its own block scales; per-tensor applies to INT and fp8 formats"),
    ("rtn-w4kvnvfp4pc", r"'kvnvfp4pc'.*nvfp4 has its own block scales; per-channel applies to INT and fp8"),
    ("rtn-w4a4.down_proj4", r"keeps down_proj's inputs at 4 bits; a kept layer needs more bits than the rest: "
                            r"one of 5, 6, 7, 8, 16 \(16: not quantized\)"),
    ("rtn-w4anvfp4.down_proj6", r"keeps down_proj's inputs at 6 bits.*one of 8, 16"),
    ("rtn-w4a16.down_proj8", r"'w4a16.down_proj8'.*is unquantized: it has no layers to keep"),
    ("rtn-w4kv4.down_proj8", r"INT KV-cache format .* takes no option 'down_proj8'.*a4.down_proj8"),
    ("rtn-w4.down_proj8", r"INT weight format .* takes no option 'down_proj8'"),
    ("rtn-w4a9", r"activation bits 9 in recipe 'rtn-w4a9' not supported; valid: 2, 3, 4, 5, 6, 7, 8, 16"),
    ("rtn-w4kv16g8", r"kv16 is unquantized"),
    ("rtn-w5x", r"bad format 'w5x'.*w<spec>\[a<spec>\]\[kv<spec>\].*bits one of 2, 3, 4, 5, 6, 7, 8, 16.*fp8, fp8e5m2, mxfp4"),
    ("rtn-wfp4", r"unknown float format 'fp4'.*valid: fp8, fp8e5m2, mxfp4, mxfp8, nvfp4"),
    ("rtn-wmxfp4sym", r"'sym' is for INT formats"),
    ("rtn-wmxfp4.up", r"unknown option 'up'.*e8m0, e4m3, fp16, fp32.*nearest, floor, ceil"),
    ("rtn-w4.ceil", r"takes no option 'ceil'"),
    ("rtn-w9", r"weight bits 9 .* valid: 2, 3, 4, 5, 6, 7, 8, 16"),
    ("rtn-w16g128", r"w16 is unquantized"),
    ("rtn", r"no weight format"),
    ("rtn-w4@c4.128", r"bad calibration 'c4.128'"),
    ("rtn-w4@imagenet.128x2048.s0", r"unknown calibration dataset 'imagenet'.*c4, ptb, tinystories, wikitext2"),
])
def test_bad_ids_name_the_bad_part_and_the_choices(bad, message):
    with pytest.raises(RecipeError, match=message):
        parse(bad)


@pytest.mark.parametrize("redundant,canonical", [
    ("gptq+lrc32-w4", "gptq+lrc-w4"), ("gptq.par.act-w4", "gptq.act.par-w4"), ("gptq.act.act-w4", "gptq.act-w4"),
    ("clip10+rtn-w4", "clip+rtn-w4"), ("lwc20+rtn-w4", "lwc+rtn-w4"), ("smooth50+rtn-w8a8", "smooth+rtn-w8a8"),
    ("quarot0+rtn-w4a4", "quarot+rtn-w4a4"), ("spinquant100+rtn-w4a4", "spinquant+rtn-w4a4"),
    ("rtn-w4afp8.e8m0", "rtn-w4afp8.e8m0"), ("rtn-w4amxfp4g32", "rtn-w4amxfp4"),
])
def test_equivalent_step_ids_print_one_canonical_form(redundant, canonical):
    assert str(parse(redundant)) == canonical and parse(canonical) == parse(redundant)


def test_from_dict_rejects_a_dict_that_disagrees_with_its_id():
    d = parse("rtn-w4").to_dict() | {"method": "gptq"}
    with pytest.raises(RecipeError, match="does not match its id"):
        Recipe.from_dict(d)
