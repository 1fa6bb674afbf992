"""The pytest plugin (ptqsuite.plugin) from the outside: selection options, usage errors, skip reasons, the baseline
life cycle (record, rerun, drift, protocol change, corruption, partial update) and non-finite metrics.

Each test runs pytest on a small project whose test module is the matrix test of tests/test_accuracy.py.

* Collection-only runs go in-process through pytester (milliseconds each).
* Runs that build and evaluate a model go in a subprocess (isolation: env vars, loaded models, syrupy state). One costs
  ~8 s on a 2-core CPU (torch and transformers imports, tokenizing WikiText-2, building the model), so there are six:
  two for missing weights, and four shared by the baseline and NaN tests through module-scoped fixtures: each runs
  once and several tests, one per behaviour, assert on its output and on the baseline files. Their cases are
  llama3-tiny-random recipes (built from a seed: no weights to find) scored on one WikiText-2 window.
* Every run passes --ptq-baselines (the rootdir is a temporary directory) and, for real runs, --device cpu.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ptqsuite import matrix as ptq_matrix
from ptqsuite import models
from ptqsuite.recipe import known_methods, known_transforms, parse

pytest_plugins = ["pytester"]

MATRIX_TEST = '''
def test_accuracy(ptq_result, ptq_baseline):
    ptq_baseline.check(ptq_result)
'''
# hypothesis' pytest plugin imports hypothesis (~1.5 s) at the end of every run; in-process, pytester then unloads it
# again, so every inline run would pay for it. No inner run here uses hypothesis.
QUIET = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
SUBPROCESS_TIMEOUT = 300
DEVICE_CLASS = "cpu-fp32"  # every real run passes --device cpu and the default dtype (float32 on CPU)
PPL_RTOL = 1e-3  # fp32: the same computation reproduces far closer than this (baselines.RELATIVE_TOLERANCE)


def tiny_matrix(recipes: list[str]) -> str:
    return f'''
tiers = ["smoke", "default", "full"]

[[cases]]
tier = "smoke"
models = ["llama3-tiny-random"]
recipes = {json.dumps(recipes)}

[budget.cpu]
"*" = {{ wikitext2 = 1 }}
'''


def case_id(recipe: str) -> str:
    return f"{recipe}-llama3-tiny-random"


# --- helpers ------------------------------------------------------------------------------------------------------

def expected_ids(tier: str = "default", *, bits=(), models_=(), methods=(), keyword: str | None = None) -> list[str]:
    """The case ids a run should select, in collection order (the matrix's, with the cases that have evaluations
    beyond perplexity first), computed from the shipped matrix."""
    m = ptq_matrix.load()
    ids = []
    for c in m.cases:
        r = c.recipe
        if (m.in_tier(c, tier)
                and (not bits or r.weight.bits in bits)
                and (not models_ or c.model.name in models_)
                and (not methods or r.names & set(methods))
                and (keyword is None or keyword.lower() in c.id.lower())):
            ids.append((not set(c.evals) - {"ppl"}, c.id))
    return [i for _, i in sorted(ids, key=lambda x: x[0])]


def setup_project(path: Path, matrix_text: str | None = None) -> None:
    (path / "test_ptq_matrix.py").write_text(MATRIX_TEST)  # unique basename: tests/test_accuracy is imported in-process
    if matrix_text is not None:
        (path / "matrix.toml").write_text(matrix_text)


def collect(pytester: pytest.Pytester, *args: str) -> tuple[list[str], pytest.RunResult]:
    """Collect in-process; return the selected case ids in collection order."""
    result = pytester.runpytest_inprocess("--collect-only", "-q", *QUIET, *args)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str() + result.stderr.str()
    ids = [m[1] for line in result.outlines if (m := re.search(r"::test_accuracy\[(.+)\]$", line))]
    return ids, result


def collected_counts(result: pytest.RunResult) -> tuple[int, int, int]:
    """(selected, collected, deselected) from `N/M tests collected (K deselected)` or `M tests collected`."""
    text = result.stdout.str()
    m = re.search(r"(\d+)/(\d+) tests? collected \((\d+) deselected\)", text)
    if m:
        return int(m[1]), int(m[2]), int(m[3])
    m = re.search(r"(\d+) tests? collected", text)
    assert m, text
    return int(m[1]), int(m[1]), 0


def real_args(path: Path, baselines: Path, *args: str) -> list[str]:
    return [*QUIET, "-v", "-rfEs", "--device", "cpu", "--ptq-matrix", str(path / "matrix.toml"),
            "--ptq-baselines", str(baselines), *args]


def run_subprocess(path: Path, *args: str, env: dict[str, str] | None = None) -> pytest.RunResult:
    """`python -m pytest` in `path`, as pytester.runpytest_subprocess runs it, for module-scoped fixtures (pytester is
    function-scoped). Same environment rules as pytester: HOME is the project dir, no outer PYTEST_ADDOPTS."""
    env = {**os.environ, "HOME": str(path), "PY_COLORS": "0", "HF_HUB_OFFLINE": "1", **(env or {})}
    env.pop("PYTEST_ADDOPTS", None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=path, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT)
    return pytest.RunResult(proc.returncode, proc.stdout.splitlines(), proc.stderr.splitlines(),
                            time.perf_counter() - start)


def output(result: pytest.RunResult) -> str:
    return "\n".join(["--- inner run's stdout:", *result.outlines, "--- stderr:", *result.errlines])


def case_outcomes(result: pytest.RunResult) -> dict[str, str]:
    """{case id: PASSED|FAILED|ERROR|SKIPPED} from the -v progress lines."""
    found = {}
    for line in result.outlines:
        m = re.match(r"^\S*::test_accuracy\[(.+?)\] (PASSED|FAILED|ERROR|SKIPPED)", line)
        if m:
            found[m[1]] = "ERROR" if "ERROR" in (found.get(m[1]), m[2]) else m[2]
    return found


def failure_sections(result: pytest.RunResult) -> dict[str, str]:
    """Each failed or errored case's report, keyed by case id (from the `___ test_accuracy[id] ___` headers)."""
    sections, current = {}, None
    for line in result.outlines:
        m = re.match(r"^_{3,} (?:ERROR at setup of )?test_accuracy\[(.+?)\] _{3,}$", line)
        if m:
            current = m[1]
            sections[current] = sections.get(current, "")
        elif re.match(r"^(={3,}|-{3,}) .* (={3,}|-{3,})$", line):
            current = None
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def baseline_file(baselines: Path, case: str) -> Path:
    return baselines / DEVICE_CLASS / "test_ptq_matrix" / f"test_accuracy[{case}].json"


def files_under(baselines: Path) -> dict[str, bytes]:
    """Every file under `baselines`, byte for byte (stray temp files and deletions show up as differences)."""
    if not baselines.exists():
        return {}
    return {str(p.relative_to(baselines)): p.read_bytes() for p in sorted(baselines.rglob("*")) if p.is_file()}


def key(case: str) -> str:
    return str(baseline_file(Path(), case))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def assert_names(text: str, bad: str, choices) -> None:
    """`text` names the bad value, and after it every valid choice (each as a whole word)."""
    assert bad in text, f"the message does not name {bad!r}:\n{text}"
    tail = text[text.index(bad) + len(bad):]
    missing = [c for c in map(str, choices) if not re.search(rf"(?<![\w.-]){re.escape(c)}(?![\w-])", tail)]
    assert not missing, f"the message for {bad!r} does not list the valid choices {missing}:\n{text}"


# --- 1. selection (collection only, in-process) -------------------------------------------------------------------

def test_select_keyword_and_bits(pytester):
    setup_project(pytester.path)
    ids, result = collect(pytester, "-k", "llama3", "--bits", "4")
    expected = expected_ids(bits={4}, keyword="llama3")
    assert expected, "the shipped matrix has no default-tier W4 llama3 case: this test would prove nothing"
    assert ids == expected
    # options deselect cases rather than not generating them (syrupy must see every case): all are collected
    total = len(ptq_matrix.load().cases)
    assert collected_counts(result) == (len(expected), total, total - len(expected))


def test_select_bits_comma_list_equals_repeated_option(pytester):
    setup_project(pytester.path)
    comma, _ = collect(pytester, "--bits", "3,4")
    repeated, _ = collect(pytester, "--bits", "3", "--bits", "4")
    assert comma == repeated == expected_ids(bits={3, 4})
    assert expected_ids(bits={3}) and expected_ids(bits={4}), "the default tier needs W3 and W4 cases"


def test_select_models(pytester):
    setup_project(pytester.path)
    m = ptq_matrix.load()
    in_tier = sorted({c.model.name for c in m.cases if m.in_tier(c, "default")})
    assert len(in_tier) >= 2, "the default tier needs two models for this test"
    one, _ = collect(pytester, "--models", in_tier[0])
    assert one == expected_ids(models_={in_tier[0]}) and one
    two, _ = collect(pytester, "--models", ",".join(in_tier[:2]))
    assert two == expected_ids(models_=set(in_tier[:2]))
    assert set(one) < set(two)


def test_select_methods(pytester):
    setup_project(pytester.path)
    ids, _ = collect(pytester, "--methods", "rtn")
    assert ids == expected_ids(methods={"rtn"}) and ids


def test_select_tier_smoke_is_a_subset(pytester):
    setup_project(pytester.path)
    smoke, _ = collect(pytester, "--tier", "smoke")
    default, _ = collect(pytester)
    full, _ = collect(pytester, "--tier", "full")
    assert smoke == expected_ids("smoke") and smoke
    assert default == expected_ids("default")
    assert full == expected_ids("full") and sorted(full) == sorted(c.id for c in ptq_matrix.load().cases)
    assert set(smoke) < set(default) <= set(full)


def test_schedule_orders_groups_by_earlier_case_times(pytester, tmp_path):
    """--ptq-schedule: xdist groups longest first by an earlier results file's case times (here stories260K's
    io shard made the longest), cases within a group in their order, unknown groups after in collection order."""
    setup_project(pytester.path)
    default = expected_ids("default", models_=("stories260k",))
    io = [c.id for c in ptq_matrix.load().cases if c.group == "stories260k.io" and c.tier == "default"]
    record = {"schema": 1, "metrics": {}, "device": {"class": "cpu-fp32"}, "protocol": {}}
    lines = [{**record, "case": io[-1], "time": {"quantize_s": 100.0, "evaluate_s": 1.0}},
             {**record, "case": "rtn-w8-stories260k", "time": {"quantize_s": 1.0, "evaluate_s": 1.0}}]
    (tmp_path / "earlier.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    ids, _ = collect(pytester, "--models", "stories260k", "--ptq-schedule", str(tmp_path / "earlier.jsonl"))
    assert ids[:len(io)] == io and ids[len(io):] == [i for i in default if i not in io]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{}\n")
    result = pytester.runpytest_inprocess("--collect-only", "-q", *QUIET, "--ptq-schedule", str(bad))
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "--ptq-schedule" in result.stderr.str()


def test_case_ids_are_recipe_then_model(pytester):
    setup_project(pytester.path, '''
tiers = ["smoke"]
[[cases]]
tier = "smoke"
models = ["llama3-tiny-random", "stories260k"]
recipes = ["rtn-w4g128", "rtn-w8pt", "rtn-w3g32sym"]
[budget.cpu]
"*" = { wikitext2 = 1 }
''')
    ids, _ = collect(pytester, "--ptq-matrix", str(pytester.path / "matrix.toml"), "--tier", "smoke")
    assert ids == ["rtn-w4g128-llama3-tiny-random", "rtn-w8pt-llama3-tiny-random", "rtn-w3g32sym-llama3-tiny-random",
                   "rtn-w4g128-stories260k", "rtn-w8pt-stories260k", "rtn-w3g32sym-stories260k"]
    # and the shipped matrix follows the same grammar throughout
    shipped, _ = collect(pytester, "--tier", "full")
    names = "|".join(re.escape(n) for n in models.registry())
    split = [re.fullmatch(rf"(.+)-({names})", i) for i in shipped]
    bad = [i for i, m in zip(shipped, split) if not m or str(parse(m[1])) != m[1]]
    assert shipped and not bad, "every id is a canonical recipe id, then a registered model"


# --- 2. usage errors (in-process) ---------------------------------------------------------------------------------

def _default_tier_bits():
    return ptq_matrix.load().weight_bits("default")


USAGE_ERRORS = {
    # id: (args, valid choices the message must list after naming the bad value)
    "bits-5": (["--bits", "5"], _default_tier_bits),
    "bits-x": (["--bits", "x"], _default_tier_bits),
    "models-nope": (["--models", "nope"], lambda: list(models.registry())),
    "methods-gptqq": (["--methods", "gptqq"], lambda: known_methods() + known_transforms()),
    "tier-huge": (["--tier", "huge"], lambda: ptq_matrix.load().tiers),
    "device-cuda": (["--device", "cuda"], lambda: ["auto", "cpu"]),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_error_names_value_and_choices(pytester, case):
    args, choices = USAGE_ERRORS[case]
    if case == "device-cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --device cuda is valid here")
    setup_project(pytester.path)
    result = pytester.runpytest_inprocess("--collect-only", "-q", *QUIET, *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    assert_names(result.stderr.str(), " ".join(args), choices())


BAD_MATRICES = {
    # id: (models line, recipes line, bad value, valid choices)
    "unknown-recipe": ('models = ["llama3-tiny-random"]', 'recipes = ["gptqq-w4"]', "gptqq", known_methods),
    "unknown-model": ('models = ["nope-7b"]', 'recipes = ["rtn-w4"]', "nope-7b", lambda: list(models.registry())),
}


@pytest.mark.parametrize("case", list(BAD_MATRICES))
def test_usage_error_bad_matrix_file(pytester, case):
    models_line, recipes_line, bad, choices = BAD_MATRICES[case]
    setup_project(pytester.path, f'''
tiers = ["smoke", "default", "full"]
[[cases]]
tier = "smoke"
{models_line}
{recipes_line}
[budget.cpu]
"*" = {{ wikitext2 = 1 }}
''')
    path = pytester.path / "matrix.toml"
    result = pytester.runpytest_inprocess("--collect-only", "-q", *QUIET, "--ptq-matrix", str(path))
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    err = result.stderr.str()
    assert str(path) in err, err
    assert_names(err, bad, choices())


# --- 3. missing weights: skip with the reason, or fail under --require-models (subprocess: env vars) ----------------

HUB_CASE = "rtn-w4-llama3-8b"
HUB_MATRIX = '''
tiers = ["smoke", "default", "full"]
[[cases]]
tier = "smoke"
models = ["llama3-8b"]
recipes = ["rtn-w4"]
[budget.cpu]
"*" = { wikitext2 = 1 }
'''


@pytest.fixture
def no_weights(pytester, monkeypatch):
    """A project whose one case is a hub model, an empty model dir and an empty Hugging Face cache."""
    setup_project(pytester.path, HUB_MATRIX)
    model_dir, hf_home = pytester.mkdir("models"), pytester.mkdir("hf-home")
    hf_cache = hf_home / "hub"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("PTQSUITE_MODEL_DIR", raising=False)
    return model_dir, hf_cache


def assert_missing_weights_reason(text: str, model_dir: Path, hf_cache: Path) -> None:
    spec = models.get("llama3-8b")
    assert f"weights for {spec.hub_id} not found" in text, text
    assert str(model_dir / spec.name) in text, f"the reason must name the model dir it looked in:\n{text}"
    assert str(hf_cache) in text, f"the reason must name the Hugging Face cache it looked in:\n{text}"
    assert re.search(rf"`\S+ download {re.escape(spec.hub_id)}`", text) and "--download-models" in text, text
    assert "PTQSUITE_MODEL_DIR" in text, text


def test_missing_weights_skip_with_reason(pytester, no_weights):
    model_dir, hf_cache = no_weights
    result = pytester.runpytest_subprocess(*real_args(pytester.path, pytester.path / "baselines", "--model-dir",
                                                      str(model_dir)), timeout=SUBPROCESS_TIMEOUT)
    assert result.ret == pytest.ExitCode.OK, output(result)
    assert case_outcomes(result) == {HUB_CASE: "SKIPPED"}, output(result)
    skip_summary = "\n".join(line for line in result.outlines if line.startswith("SKIPPED"))
    assert_missing_weights_reason(skip_summary, model_dir, hf_cache)


def test_missing_weights_fail_with_require_models(pytester, no_weights):
    model_dir, hf_cache = no_weights
    result = pytester.runpytest_subprocess(*real_args(pytester.path, pytester.path / "baselines", "--model-dir",
                                                      str(model_dir), "--require-models"), timeout=SUBPROCESS_TIMEOUT)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, output(result)
    # pytest.fail in the ptq_result fixture: pytest reports it as an error in setup, which is still a failure
    assert case_outcomes(result)[HUB_CASE] in ("FAILED", "ERROR"), output(result)
    section = failure_sections(result)[HUB_CASE]
    assert f"{HUB_CASE}:" in section, section
    assert_missing_weights_reason(section, model_dir, hf_cache)


def test_missing_weights_advice_names_an_installed_cli(tmp_path, monkeypatch):
    """The download command the reason suggests exists in this environment (huggingface_hub >= 1.0 ships `hf`,
    not `huggingface-cli`). In-process, on models.load: the reason is WeightsMissing's message."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = models.get("llama3-8b")
    with pytest.raises(models.WeightsMissing) as missing:
        models.load(spec, "cpu", torch.float32, models.Sources(model_dir=str(tmp_path / "models")))
    m = re.search(rf"`(\S+) download {re.escape(spec.hub_id)}`", str(missing.value))
    assert m, str(missing.value)
    cli = m[1]
    assert shutil.which(cli) or (Path(sys.executable).parent / cli).exists(), (
        f"the reason says to run `{cli} download ...`, but no `{cli}` is installed here "
        f"(next to {sys.executable} or on PATH): {missing.value}")


# --- 4. baselines -------------------------------------------------------------------------------------------------
# One scenario, three runs, each shared by the tests after it:
#   recorded: --snapshot-update with no baselines                                       -> (b)
#   checked:  a plain run after editing the recorded baselines, one edit per case        -> (a), (c), (d), (e), (f)
#   updated:  --snapshot-update --bits 2,4 on checked's files                           -> (f) under update, (g)

BETTER, WORSE, PROTOCOL, CORRUPT, MISSING, UNCHANGED = map(
    case_id, ["rtn-w4", "rtn-w8", "rtn-w3", "rtn-w2", "rtn-w3g128", "rtn-w4g128"])
ROUND_TRIP_MATRIX = tiny_matrix(["rtn-w8", "rtn-w4", "rtn-w3", "rtn-w2", "rtn-w3g128", "rtn-w4g128"])
UPDATE_SELECTED = {BETTER, CORRUPT, UNCHANGED}  # --bits 2,4
PPL_EDIT = {BETTER: 1.05, WORSE: 0.95}  # stored wikitext2.ppl x factor: +5 % makes the measurement look better


# Under xdist (.ci/run: -n 2 --dist loadgroup) each group's tests go to one worker, which runs the group's shared
# subprocess runs once; the two groups (and the rest) can still run in parallel.
BASELINE_GROUP = pytest.mark.xdist_group("ptqsuite-plugin-baselines")
NAN_GROUP = pytest.mark.xdist_group("ptqsuite-plugin-nan")


@dataclass(frozen=True)
class Run:
    result: pytest.RunResult
    baselines: Path
    before: dict[str, bytes]  # files under baselines before the run
    after: dict[str, bytes]


def run_project(root: Path, matrix_text: str, *args: str, baselines_from: dict[str, bytes] | None = None,
                conftest: str | None = None) -> Run:
    root.mkdir(parents=True)
    setup_project(root, matrix_text)
    if conftest:
        (root / "conftest.py").write_text(conftest)
    baselines = root / "baselines"
    for name, blob in (baselines_from or {}).items():
        (baselines / name).parent.mkdir(parents=True, exist_ok=True)
        (baselines / name).write_bytes(blob)
    before = files_under(baselines)
    result = run_subprocess(root, *real_args(root, baselines, *args))
    return Run(result, baselines, before, files_under(baselines))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("baselines") / "recorded"
    return run_project(root, ROUND_TRIP_MATRIX, "--snapshot-update", "--ptq-results", str(root / "results.jsonl"))


def edited(files: dict[str, bytes]) -> dict[str, bytes]:
    """The recorded baselines with one edit per case (see the names above)."""
    out = dict(files)
    for case, factor in PPL_EDIT.items():
        data = json.loads(out[key(case)])
        data["metrics"]["wikitext2.ppl"]["value"] *= factor
        out[key(case)] = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    data = json.loads(out[key(PROTOCOL)])
    data["protocol"]["batch_size"] = 3
    out[key(PROTOCOL)] = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    out[key(CORRUPT)] = b"{not json"
    del out[key(MISSING)]
    return out


@pytest.fixture(scope="module")
def checked(recorded, tmp_path_factory) -> Run:
    assert recorded.result.ret == pytest.ExitCode.OK, f"recording the baselines failed:\n{output(recorded.result)}"
    root = tmp_path_factory.mktemp("baselines") / "checked"
    return run_project(root, ROUND_TRIP_MATRIX, "--ptq-report", str(root / "report"),
                       baselines_from=edited(recorded.after))


@pytest.fixture(scope="module")
def updated(checked, tmp_path_factory) -> Run:
    return run_project(tmp_path_factory.mktemp("baselines") / "updated", ROUND_TRIP_MATRIX,
                       "--snapshot-update", "--bits", "2,4", baselines_from=checked.after)


@BASELINE_GROUP
def test_snapshot_update_records_one_json_file_per_case(recorded):
    """(b) --snapshot-update writes one JSON file per case, with metrics, reference, protocol and environment."""
    result = recorded.result
    assert result.ret == pytest.ExitCode.OK, output(result)
    cases = [BETTER, WORSE, PROTOCOL, CORRUPT, MISSING, UNCHANGED]
    assert case_outcomes(result) == dict.fromkeys(cases, "PASSED"), output(result)
    assert set(recorded.after) == {key(c) for c in cases}, "one file per case, and no stray (temp) files"
    for case in cases:
        data = json.loads(recorded.after[key(case)])
        assert {"metrics", "reference", "protocol", "environment"} <= set(data), case
        assert data["case"] == case
        assert data["protocol"]["device_class"] == DEVICE_CLASS
        assert {"wikitext2.ppl", "wikitext2.recovery", "bits_per_weight"} <= set(data["metrics"]), case
        assert data["metrics"]["wikitext2.ppl"]["windows"] == 1, "the matrix budget scores one window"
        assert "wikitext2.ppl" in data["reference"], case
        assert {"torch", "transformers", "ptqsuite"} <= set(data["environment"]), case


@BASELINE_GROUP
def test_missing_baseline_fails_and_says_how_to_record(checked):
    """(a) A case without a baseline fails, says how to record one, and a plain run writes nothing."""
    assert case_outcomes(checked.result)[MISSING] == "FAILED", output(checked.result)
    section = failure_sections(checked.result)[MISSING]
    assert "record one with --snapshot-update" in section, section
    assert key(MISSING) not in checked.after


@BASELINE_GROUP
def test_rerun_passes_and_leaves_baselines_byte_identical(checked):
    """(c) A rerun against an untouched baseline passes; a run without --snapshot-update changes no file at all."""
    assert case_outcomes(checked.result)[UNCHANGED] == "PASSED", output(checked.result)
    assert checked.after == checked.before


@BASELINE_GROUP
@pytest.mark.parametrize("case, direction", [(BETTER, "better than baseline"), (WORSE, "WORSE than baseline")],
                         ids=["ppl-plus-5pct-better", "ppl-minus-5pct-worse"])
def test_ppl_drift_fails_with_baseline_measured_delta_tolerance(checked, recorded, case, direction):
    """(d) Stored wikitext2.ppl moved by +-5 %: the case fails and shows baseline, measured, delta, tolerance and
    which way it moved."""
    assert case_outcomes(checked.result)[case] == "FAILED", output(checked.result)
    text = failure_sections(checked.result)[case]
    m = re.search(r"wikitext2\.ppl: baseline (\S+), measured (\S+), delta (\S+) \(\S+\), tolerance ±(\S+)% "
                  r"relative[^:]*: (.*)", text)
    assert m, f"no 'baseline, measured, delta, tolerance' line for wikitext2.ppl:\n{text}"
    first = json.loads(recorded.after[key(case)])["metrics"]["wikitext2.ppl"]["value"]
    baseline, measured, delta, tol_pct = map(float, m.group(1, 2, 3, 4))
    assert baseline == pytest.approx(first * PPL_EDIT[case], rel=1e-5)
    assert measured == pytest.approx(first, rel=PPL_RTOL)
    assert delta == pytest.approx(measured - baseline, rel=1e-3)
    assert 0 < tol_pct < 100 * abs(delta / baseline)
    assert m[5].startswith(direction), text
    assert ("WORSE" in text) == (direction.startswith("WORSE")), text


def results_of(run: Run, path: str) -> dict[str, dict]:
    from ptqsuite import results

    return {r["case"]: r for r in results.read(run.baselines.parent / path)}


@BASELINE_GROUP
def test_results_file_records_each_case_with_its_baseline_status(checked, recorded):
    """--ptq-results / --ptq-report: one record per case, whatever its outcome, with the measured metrics, times,
    the device, and how it compared with its baseline (recorded, matched, differs, missing)."""
    first = results_of(recorded, "results.jsonl")
    assert {r["baseline"]["status"] for r in first.values()} == {"recorded"}, first
    now = results_of(checked, "report/results.jsonl")
    assert set(now) == set(first) == {BETTER, WORSE, PROTOCOL, CORRUPT, MISSING, UNCHANGED}
    status = {case: r.get("baseline", {}).get("status") for case, r in now.items()}
    assert status == {UNCHANGED: "matched", MISSING: "missing", BETTER: "differs", WORSE: "differs",
                      PROTOCOL: "differs", CORRUPT: None}, status  # a corrupt baseline is never read into a record
    assert {case: r["outcome"] for case, r in now.items()} == {
        c: "passed" if c == UNCHANGED else "failed" for c in now}
    worse = now[WORSE]
    assert worse["baseline"]["metrics"]["wikitext2.ppl"] == pytest.approx(
        first[WORSE]["metrics"]["wikitext2.ppl"]["value"] * PPL_EDIT[WORSE])
    assert any("WORSE than baseline" in line for line in worse["baseline"]["lines"]), worse["baseline"]
    assert worse["baseline"]["worse"] == ["wikitext2.ppl"] and now[BETTER]["baseline"]["worse"] == []
    for r in now.values():
        assert r["device"]["class"] == DEVICE_CLASS and r["time"]["quantize_s"] >= 0 and r["time"]["evaluate_s"] > 0
        assert r["bits_per_weight"] == r["metrics"]["bits_per_weight"]["value"]
        assert r["size"]["model_bytes"] > 0 and "torch" in r["environment"]
    assert (checked.baselines.parent / "report" / "report.md").is_file()
    assert (checked.baselines.parent / "report" / "report.html").is_file()


@BASELINE_GROUP
def test_protocol_change_fails(checked):
    """(e) A protocol field that differs from the run's fails the case with 'protocol changed' and the field."""
    assert case_outcomes(checked.result)[PROTOCOL] == "FAILED", output(checked.result)
    text = failure_sections(checked.result)[PROTOCOL]
    assert "protocol changed" in text and "batch_size" in text, text


@BASELINE_GROUP
def test_corrupt_baseline_fails_naming_the_file(checked):
    """(f) A baseline that is not JSON fails the case with 'corrupt baseline file' and its path."""
    assert case_outcomes(checked.result)[CORRUPT] in ("FAILED", "ERROR"), output(checked.result)
    text = failure_sections(checked.result)[CORRUPT]
    assert "corrupt baseline file" in text, text
    assert str(baseline_file(checked.baselines, CORRUPT)) in text, text


@BASELINE_GROUP
def test_snapshot_update_never_replaces_or_deletes_a_corrupt_baseline(updated):
    """(f) Under --snapshot-update the corrupt case still fails, and its file is unchanged byte for byte."""
    assert case_outcomes(updated.result)[CORRUPT] in ("FAILED", "ERROR"), output(updated.result)
    assert "corrupt baseline file" in failure_sections(updated.result)[CORRUPT]
    assert key(CORRUPT) in updated.after, f"--snapshot-update deleted the corrupt baseline\n{output(updated.result)}"
    assert updated.after[key(CORRUPT)] == b"{not json"


@BASELINE_GROUP
def test_snapshot_update_leaves_unselected_baselines_untouched(updated):
    """(g) `--snapshot-update --bits 2,4` touches only the selected cases: the others' files are neither deleted nor
    rewritten (two of them disagree with this run, so they would be re-recorded if selected), and no baseline
    appears for an unselected case that has none."""
    outcomes = case_outcomes(updated.result)
    assert set(outcomes) == UPDATE_SELECTED, output(updated.result)
    unselected = {k: v for k, v in updated.before.items() if k not in {key(c) for c in UPDATE_SELECTED}}
    assert {k: v for k, v in updated.after.items() if k not in {key(c) for c in UPDATE_SELECTED}} == unselected
    assert key(MISSING) not in updated.after


@BASELINE_GROUP
def test_snapshot_update_rerecords_a_drifted_case_and_keeps_a_matching_one(updated, recorded):
    """--snapshot-update re-records the selected drifted case, and leaves a matching baseline byte-identical."""
    outcomes = case_outcomes(updated.result)
    assert outcomes[BETTER] == outcomes[UNCHANGED] == "PASSED", output(updated.result)
    value = json.loads(updated.after[key(BETTER)])["metrics"]["wikitext2.ppl"]["value"]
    first = json.loads(recorded.after[key(BETTER)])["metrics"]["wikitext2.ppl"]["value"]
    assert value == pytest.approx(first, rel=PPL_RTOL), "the drifted W4 baseline was not re-recorded"
    assert updated.after[key(UNCHANGED)] == updated.before[key(UNCHANGED)], "a matching baseline was rewritten"


# --- 5. non-finite metrics ----------------------------------------------------------------------------------------
# One run, --snapshot-update, every perplexity NaN: rtn-w4 has no baseline, rtn-w8 has one.

NAN_CONFTEST = '''
import pytest

import ptqsuite.runner
from ptqsuite.eval.ppl import PplResult


@pytest.fixture(autouse=True)
def nan_perplexity(monkeypatch):
    """Every perplexity the runner computes is NaN (patched where runner.py looks the name up)."""
    def perplexity(*args, **kwargs):
        nan = float("nan")
        return PplResult(ppl=nan, nll=nan, nll_std=0.0, windows=1, tokens=2047, seqlen=2048, protocol="nan-stub")

    monkeypatch.setattr(ptqsuite.runner, "perplexity", perplexity)
'''
NAN_NEW, NAN_EXISTING = case_id("rtn-w4"), case_id("rtn-w8")
NAN_EXISTING_BASELINE = (json.dumps({"case": NAN_EXISTING, "metrics": {"wikitext2.ppl": {"value": 800.0}},
                                     "protocol": {}}, indent=2, sort_keys=True) + "\n").encode()


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory) -> Run:
    return run_project(tmp_path_factory.mktemp("nan") / "project", tiny_matrix(["rtn-w4", "rtn-w8"]),
                       "--snapshot-update", conftest=NAN_CONFTEST,
                       baselines_from={key(NAN_EXISTING): NAN_EXISTING_BASELINE})


@NAN_GROUP
@pytest.mark.parametrize("case", [NAN_NEW, NAN_EXISTING], ids=["no-baseline", "with-baseline"])
def test_nan_metric_fails_naming_case_and_metric(nan_run, case):
    assert case_outcomes(nan_run.result).get(case) == "FAILED", output(nan_run.result)
    text = failure_sections(nan_run.result)[case]
    assert case in text and "non-finite" in text and "wikitext2.ppl" in text, text


@NAN_GROUP
def test_nan_metric_is_not_recorded_even_with_snapshot_update(nan_run):
    assert key(NAN_NEW) not in nan_run.after, "a NaN result was recorded as a baseline"


@NAN_GROUP
def test_nan_metric_with_snapshot_update_keeps_existing_baseline(nan_run):
    """A NaN run under --snapshot-update must not delete (or rewrite) the baseline already there."""
    assert nan_run.after.get(key(NAN_EXISTING)) == NAN_EXISTING_BASELINE, (
        f"--snapshot-update deleted or changed the baseline of a NaN case\n{output(nan_run.result)}")
