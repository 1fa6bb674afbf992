"""Recipe ids: readable, round-tripping, and strict about bad input."""
import json

import pytest

from ptqsuite.formats import IntFormat
from ptqsuite.granularity import PerChannel, PerGroup, PerTensor
from ptqsuite.recipe import Calibration, QuantSpec, Recipe, RecipeError, parse

IDS = ["rtn-w4g128", "rtn-w4g128sym", "rtn-w8", "rtn-w8pt", "rtn-w3sym", "rtn-w16", "rtn-w2g64@wikitext2.64x512.s3"]


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


@pytest.mark.parametrize("bad,message", [
    ("gptqq-w4", r"unknown method 'gptqq'.*known methods: rtn"),
    ("quarot+rtn-w4", r"unknown transform 'quarot'"),
    ("rtn-w5x", r"bad weight format 'w5x'.*bits one of 2, 3, 4, 5, 6, 7, 8, 16"),
    ("rtn-w9", r"weight bits 9 .* valid: 2, 3, 4, 5, 6, 7, 8, 16"),
    ("rtn-w16g128", r"w16 is unquantized"),
    ("rtn", r"no weight format"),
    ("rtn-w4@c4.128", r"bad calibration 'c4.128'"),
    ("rtn-w4@imagenet.128x2048.s0", r"unknown calibration dataset 'imagenet'.*c4, ptb, tinystories, wikitext2"),
])
def test_bad_ids_name_the_bad_part_and_the_choices(bad, message):
    with pytest.raises(RecipeError, match=message):
        parse(bad)


def test_from_dict_rejects_a_dict_that_disagrees_with_its_id():
    d = parse("rtn-w4").to_dict() | {"method": "gptq"}
    with pytest.raises(RecipeError, match="does not match its id"):
        Recipe.from_dict(d)
