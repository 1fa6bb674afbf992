"""The matrix file: what a case evaluates, how big each evaluation is, and bad entries named with the valid ones."""
import pytest

from ptqsuite import matrix

HEAD = '''tiers = ["default"]
[budget.cpu]
"*" = { wikitext2 = 2 }
'''


def load(tmp_path, text):
    path = tmp_path / "matrix.toml"
    path.write_text(HEAD + text)
    return matrix.load(path)


def cases(evals):
    return f'[[cases]]\ntier = "default"\nmodels = ["stories260k"]\nrecipes = ["rtn-w4"]\nevals = {evals}\n'


def test_evals_default_to_perplexity_and_name_the_xdist_group(tmp_path):
    m = load(tmp_path, '[[cases]]\ntier = "default"\nmodels = ["stories260k"]\nrecipes = ["rtn-w4", "rtn-w8"]\n')
    assert [(c.evals, c.group) for c in m.cases] == [(("ppl",), "stories260k")] * 2
    m = load(tmp_path, cases('["ppl", "longctx"]') + '[longctx.cpu]\n"*" = { lengths = [256], n = 2 }\n')
    assert m.cases[0].group == "stories260k.longctx"
    assert m.size("longctx", "cuda", "stories260k") == {"lengths": [256], "n": 2}  # falls back to the cpu table


@pytest.mark.parametrize("evals,message", [
    ('["mmlu"]', r"evals \['mmlu'\] of models \['stories260k'\]: one or more of ppl, zeroshot, longctx"),
    ("[]", r"evals \[\]"),
    ('["ppl", "ppl"]', r"each once"),
])
def test_bad_evals_name_the_valid_ones(tmp_path, evals, message):
    with pytest.raises(ValueError, match=message):
        load(tmp_path, cases(evals))


@pytest.mark.parametrize("table,message", [
    ('[zeroshot.cpu]\n"*" = { mmlu = 10 }\n', r"zeroshot.cpu.\* names \['mmlu'\]; valid: arc_challenge, arc_easy, boolq"),
    ('[longctx.cpu]\n"*" = { lengths = [256], n = 2, depth = 3 }\n', r"longctx.cpu.\* names \['depth'\]; valid: "
                                                                      r"lengths, n, task"),
    ('[longctx.cpu]\n"*" = { lengths = [256], n = 2, task = "needle" }\n',
     r"longctx.cpu.\*.task 'needle'; valid: lines, passkey"),
    ('[longctx.cpu]\nnot-a-model = { lengths = [256], n = 2 }\n', r"not-a-model"),
])
def test_bad_sizes_name_the_valid_ones(tmp_path, table, message):
    with pytest.raises(ValueError, match=message):
        load(tmp_path, cases('["ppl"]') + table)


def test_every_shipped_evaluation_has_a_size_on_every_device():
    m = matrix.load()
    for case in m.cases:
        for evaluation in set(case.evals) - {"ppl"}:
            for device in ("cpu", "cuda"):
                assert m.size(evaluation, device, case.model.name), (case.id, evaluation, device)
