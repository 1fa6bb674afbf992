"""The pytest plugin (entry point ``pytest11: ptqsuite``): options, the matrix as parametrized cases, fixtures.

Any test that requests ``ptq_case`` (or ``ptq_result``) is parametrized over every case of the matrix; options
deselect cases rather than not generating them, so syrupy can tell "not selected" from "removed" and never deletes
a baseline because a run was filtered.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from syrupy.exceptions import SnapshotDoesNotExist

from . import matrix as matrix_mod
from . import models, progress, shared
from .baselines import BaselineExtension, CorruptBaseline, check_finite, compare
from .matrix import Case, Matrix
from .recipe import known_methods, known_transforms
from .runner import Runner, Settings

OPTIONS_KEY = pytest.StashKey["Options"]()
GPU_KEY = "ptqsuite_cuda_visible_devices"  # xdist workerinput: the GPU a worker is pinned to
RECORD = "ptq_record"  # user_properties key: a case's results record, carried to the controller by xdist


class BaselineEnvironmentWarning(UserWarning):
    """The baseline was recorded with other library versions or settings; the numbers still matched."""


@dataclass(frozen=True)
class Options:
    matrix: Matrix
    tier: str
    bits: frozenset[int]
    models: frozenset[str]
    methods: frozenset[str]
    settings: Settings
    baselines: Path
    require_models: bool

    def selects(self, case: Case) -> bool:
        r = case.recipe
        return (self.matrix.in_tier(case, self.tier)
                and (not self.bits or r.weight.bits in self.bits)
                and (not self.models or case.model.name in self.models)
                and (not self.methods or bool(r.names & self.methods)))


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("ptqsuite", "PTQ regression matrix")
    g.addoption("--bits", action="append", default=[], metavar="B[,B..]",
                help="only cases whose weights are quantized to these bit-widths (repeatable or comma-separated)")
    g.addoption("--models", action="append", default=[], metavar="NAME[,..]", help="only these models")
    g.addoption("--methods", action="append", default=[], metavar="NAME[,..]",
                help="only recipes using these mitigation methods or transforms")
    g.addoption("--tier", default="default", help="matrix tier: smoke, default (CPU CI) or full (GPU)")
    g.addoption("--device", default="auto", help="auto (cuda when visible), cpu, cuda or cuda:N")
    g.addoption("--ptq-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                help="compute dtype; auto: float32 on CPU, bfloat16 on GPU")
    g.addoption("--ptq-batch-size", type=int, default=None, help="evaluation batch size (default: fit the logits in 1 GiB)")
    g.addoption("--model-dir", default=os.environ.get("PTQSUITE_MODEL_DIR"),
                help="directory holding full-size model folders (default $PTQSUITE_MODEL_DIR)")
    g.addoption("--download-models", action="store_true", help="download missing hub models instead of skipping")
    g.addoption("--require-models", action="store_true", help="fail, rather than skip, cases whose weights are missing")
    g.addoption("--ptq-matrix", default=None, help="matrix TOML (default: the one shipped with ptqsuite)")
    g.addoption("--ptq-baselines", default=None, help="baseline directory (default: <rootdir>/baselines)")
    g.addoption("--ptq-results", default=None, metavar="FILE",
                help="write a results file: one JSON line per case (metrics, sizes, times, versions, baseline status)")
    g.addoption("--ptq-report", default=None, metavar="DIR",
                help="write DIR/results.jsonl and a report (report.md, self-contained report.html, plots)")
    g.addoption("--ptq-schedule", default=None, metavar="RESULTS",
                help="under --dist loadgroup, start the xdist groups longest first by the case times in an earlier "
                     "results file (--ptq-results); groups it does not know follow, in collection order")
    g.addoption("--ptq-gpus", default=None, metavar="ID[,ID..]",
                help="under xdist, pin worker i to GPU ids[i mod len] through CUDA_VISIBLE_DEVICES "
                     "(default: every visible GPU; -n auto starts one worker per GPU)")


def pytest_configure(config: pytest.Config) -> None:
    for line in ("gpu: needs a CUDA device; skipped without one", "slow: minutes on a 2-core CPU; runs with --tier full",
                 "network: needs the Python package registry"):
        config.addinivalue_line("markers", line)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None or getattr(config.option, "numprocesses", None):
        # Under xdist syrupy matches snapshots to tests by nodeid, and the loadgroup suffix (XdistGroups) hides the
        # parameter part: every deselected case's baseline then counts as unused, failing the run and, under
        # --snapshot-update, deleting baselines of cases that are still in the matrix. Obsolete baselines (cases
        # removed from the matrix) are pruned by a single-process `pytest --snapshot-update`.
        config.option.disable_unused_snapshots = True
    if workerinput is not None and workerinput.get(GPU_KEY) is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = workerinput[GPU_KEY]  # before anything initialises CUDA here
    config.stash[OPTIONS_KEY] = _options(config)
    if os.environ.get("PYTEST_XDIST_WORKER") and not config.pluginmanager.has_plugin("ptqsuite-xdist-groups"):
        config.pluginmanager.register(XdistGroups(), "ptqsuite-xdist-groups")
    if workerinput is None and (config.getoption("--ptq-results") or config.getoption("--ptq-report")):
        config.pluginmanager.register(ResultsWriter(config), "ptqsuite-results")
    if config.pluginmanager.has_plugin("xdist") and not config.pluginmanager.has_plugin("ptqsuite-gpus"):
        config.pluginmanager.register(GpuWorkers(config), "ptqsuite-gpus")
    if workerinput is None and getattr(config.option, "numprocesses", None) \
            and not config.pluginmanager.has_plugin("ptqsuite-shared"):
        config.pluginmanager.register(shared.RunDirectory(), "ptqsuite-shared")
    if config.getoption("--ptq-schedule"):
        config.option.loadscopereorder = False  # xdist's default orders groups by test count: keep ours
    _install_progress(config, worker=workerinput is not None)


def _install_progress(config: pytest.Config, worker: bool) -> None:
    """Status lines for long quantizations and evaluations, written past pytest's output capture to the
    terminal; none on xdist workers (no terminal of their own) or where progress.wanted says no (CI, pipes)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if worker or capman is None or config.pluginmanager.getplugin("terminalreporter") is None \
            or not progress.wanted(sys.__stdout__):
        progress.install(None)
        return

    def write(line: str) -> None:
        with capman.global_and_fixture_disabled():
            config.get_terminal_writer().write(line, flush=True)

    progress.install(write)


def _split(values: list[str]) -> list[str]:
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _options(config: pytest.Config) -> Options:
    get = config.getoption
    path = Path(get("--ptq-matrix")) if get("--ptq-matrix") else matrix_mod.DEFAULT
    try:
        matrix = matrix_mod.load(path)
    except (ValueError, KeyError) as e:
        raise pytest.UsageError(f"bad matrix {path}: {e}") from None
    tier = get("--tier")
    if tier not in matrix.tiers:
        raise pytest.UsageError(f"--tier {tier}: unknown tier; valid: {', '.join(matrix.tiers)}")
    return Options(
        matrix=matrix, tier=tier, bits=_valid_bits(_split(get("--bits")), matrix, tier),
        models=_valid_models(_split(get("--models")), matrix, tier),
        methods=_valid_methods(_split(get("--methods"))), settings=_settings(config),
        baselines=Path(get("--ptq-baselines") or config.rootpath / "baselines"),
        require_models=get("--require-models"),
    )


def _valid_bits(values: list[str], matrix: Matrix, tier: str) -> frozenset[int]:
    valid = matrix.weight_bits(tier)
    choices = ", ".join(map(str, valid))
    for v in values:
        if not v.isdigit():
            raise pytest.UsageError(f"--bits {v}: not an integer; valid weight bit-widths in tier {tier!r}: {choices}")
        if int(v) not in valid:
            raise pytest.UsageError(f"--bits {v}: no case in tier {tier!r} quantizes weights to {v} bits; valid: {choices}")
    return frozenset(map(int, values))


def _valid_models(values: list[str], matrix: Matrix, tier: str) -> frozenset[str]:
    in_tier = sorted({c.model.name for c in matrix.cases if matrix.in_tier(c, tier)})
    for v in values:
        if v not in models.registry():
            raise pytest.UsageError(f"--models {v}: unknown model; known models: {', '.join(models.registry())}")
        if v not in in_tier:
            raise pytest.UsageError(f"--models {v}: no case in tier {tier!r} uses it; models in this tier: {', '.join(in_tier)}")
    return frozenset(values)


def _valid_methods(values: list[str]) -> frozenset[str]:
    known = known_methods() + known_transforms()
    for v in values:
        if v not in known:
            raise pytest.UsageError(f"--methods {v}: unknown method; known methods and transforms: {', '.join(known)}")
    return frozenset(values)


def _settings(config: pytest.Config) -> Settings:
    name = config.getoption("--device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"--device {name}: not a device; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name}: no CUDA device is visible here; valid: auto, cpu")
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device {name}: unsupported device type; valid: auto, cpu, cuda, cuda:N")
    dtype = config.getoption("--ptq-dtype")
    dtype = getattr(torch, dtype) if dtype != "auto" else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    sources = models.Sources(model_dir=config.getoption("--model-dir"), download=config.getoption("--download-models"))
    return Settings(device=device, dtype=dtype, sources=sources, batch_size=config.getoption("--ptq-batch-size"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "ptq_case" in metafunc.fixturenames:
        cases = metafunc.config.stash[OPTIONS_KEY].matrix.cases
        # One xdist group per model (and long evaluations): with --dist loadgroup a model loads once per group.
        metafunc.parametrize("ptq_case", [pytest.param(c, id=c.id, marks=pytest.mark.xdist_group(c.group))
                                          for c in cases])


def visible_gpus(config: pytest.Config) -> list[str]:
    """The GPU ids workers are spread over: --ptq-gpus, else CUDA_VISIBLE_DEVICES's entries, else every device."""
    if config.getoption("--ptq-gpus"):
        return _split([config.getoption("--ptq-gpus")])
    if config.getoption("--device") == "cpu" or not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return _split([listed]) if listed else [str(i) for i in range(torch.cuda.device_count())]


class GpuWorkers:
    """On the xdist controller: one worker per GPU under ``-n auto``, and worker gw<i> pinned to the i-th GPU
    (round robin) through CUDA_VISIBLE_DEVICES, set in the worker before CUDA initialises (pytest_configure). A
    worker then sees one device, cuda:0, and loadgroup keeps each model's cases on one worker and so one GPU."""

    def __init__(self, config: pytest.Config):
        self.gpus = visible_gpus(config)

    def pytest_xdist_auto_num_workers(self, config: pytest.Config) -> int | None:
        return len(self.gpus) or None

    def pytest_configure_node(self, node) -> None:
        if self.gpus:
            index = int(node.gateway.id.removeprefix("gw"))
            node.workerinput[GPU_KEY] = self.gpus[index % len(self.gpus)]


class ResultsWriter:
    """On the controller (or a run without xdist): gathers every case's results record from the test reports,
    then writes --ptq-results and --ptq-report at the end of the session."""

    def __init__(self, config: pytest.Config):
        self.config, self.records = config, {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, record in report.user_properties:
            if name == RECORD and (report.when == "call" or report.outcome != "passed"):
                self.records[report.nodeid] = {**record, "outcome": report.outcome}

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        from . import results

        records = list(self.records.values())
        target, report_dir = self.config.getoption("--ptq-results"), self.config.getoption("--ptq-report")
        if target:
            results.write(Path(target), records)
        if report_dir:
            from . import report

            results.write(Path(report_dir) / "results.jsonl", records)
            report.render(records, Path(report_dir))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for option in ("--ptq-results", "--ptq-report"):
            if self.config.getoption(option):
                terminalreporter.write_line(f"ptqsuite: {len(self.records)} case(s) written to "
                                            f"{self.config.getoption(option)} ({option})")


class XdistGroups:
    """Registered on xdist workers by pytest_configure."""

    @pytest.hookimpl(tryfirst=True)  # before syrupy records the collected nodeids
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        _suffix_groups(config, items)


def _suffix_groups(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each test its xdist group suffix (``nodeid@group``) where pytest-xdist's own renaming has no effect.

    ``--dist loadgroup`` schedules by that suffix, which xdist 3.8 adds by assigning ``item._nodeid``; pytest 9.2
    reads ``nodeid`` from ``item._id`` instead, so the assignment is lost, every test is scheduled on its own and a
    model's cases, and the ordering tests that reuse them, land on different workers (each recomputing). Setting
    the suffix through ``_id`` restores the grouping; on versions where xdist's renaming works this does nothing.
    """
    if not getattr(config.option, "loadgroup", False):  # set by xdist on its workers under --dist loadgroup
        return
    try:
        from _pytest.nodeid import coerce_node_id
    except ImportError:  # pytest < 9.2: xdist's renaming works
        return
    for item in items:
        group = _xdist_group(item)
        if group and not item.nodeid.endswith("@" + group) and hasattr(item, "_id"):
            item._id = coerce_node_id(f"{item.nodeid}@{group}")


def _xdist_group(item: pytest.Item) -> str | None:
    """The item's xdist group name as xdist forms it (its groups' names joined by "_"), None without one."""
    return "_".join(sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                            for m in item.iter_markers("xdist_group")})) or None


def _case_of(item: pytest.Item) -> Case | None:
    """The matrix case a test is parametrized with, None for other tests."""
    return item.callspec.params.get("ptq_case") if hasattr(item, "callspec") else None


@pytest.hookimpl(trylast=True)  # after syrupy has recorded what was collected
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    opts = config.stash[OPTIONS_KEY]
    keep, drop = [], []
    for item in items:
        case = _case_of(item)
        (drop if case is not None and not opts.selects(case) else keep).append(item)
        if case is not None and case.unsupported:
            item.add_marker(pytest.mark.skip(reason=f"{case.id}: does not apply: {case.unsupported}"))
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine"))
        if item.get_closest_marker("slow") and opts.tier != "full":
            item.add_marker(pytest.mark.skip(reason=f"slow on this machine: runs with --tier full (this run: --tier {opts.tier})"))
    if drop:
        config.hook.pytest_deselected(items=drop)
    # longest first: cases with zero-shot or long-context evaluations (minutes each) start before the perplexity
    # ones, so under xdist their groups are scheduled first and do not finish last on an otherwise idle machine
    items[:] = sorted(keep, key=lambda item: not _long(item))
    if config.getoption("--ptq-schedule"):
        items[:] = longest_groups_first(items, _case_seconds(config.getoption("--ptq-schedule")))


def _case_seconds(path: str) -> dict[str, float]:
    from . import results

    try:
        records = results.read(Path(path))
    except results.ResultsError as e:
        raise pytest.UsageError(f"--ptq-schedule: {e}") from None
    return {r["case"]: r["time"]["quantize_s"] + r["time"]["evaluate_s"] for r in records if "time" in r}


def longest_groups_first(items: list[pytest.Item], seconds: dict[str, float]) -> list[pytest.Item]:
    """``items`` with their xdist groups ordered by the summed ``seconds`` of their cases, longest first (LPT: on
    n workers the longest groups start first and the short ones fill in), order within a group kept; tests of
    unknown or no cost keep their order after."""
    groups = {item: _xdist_group(item) or item.nodeid for item in items}  # ungrouped: a unit of its own
    cost: dict[str, float] = {}
    for item, group in groups.items():
        case = _case_of(item)
        cost[group] = cost.get(group, 0.0) + (seconds.get(case.id, 0.0) if case else 0.0)
    return sorted(items, key=lambda item: -cost[groups[item]])


def _long(item: pytest.Item) -> bool:
    case = _case_of(item)
    return case is not None and bool(set(case.evals) - {"ppl"})


@pytest.fixture(scope="session")
def ptq_options(pytestconfig: pytest.Config) -> Options:
    return pytestconfig.stash[OPTIONS_KEY]


@pytest.fixture(scope="session")
def ptq_runner(ptq_options: Options, pytestconfig: pytest.Config) -> Runner:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # no oversubscription under xdist: on a GPU too, where workers sharing one GPU run lm-eval's
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))  # and the eager KV paths' CPU work
    directory = getattr(pytestconfig, "workerinput", {}).get(shared.WORKERINPUT_KEY)
    return Runner(ptq_options.settings, ptq_options.matrix, shared=Path(directory) if directory else None)


def run_or_skip(runner: Runner, case: Case, require_models: bool):
    """A case's result; missing weights skip it with the reason, or fail it under --require-models."""
    try:
        return runner.run(case)
    except models.WeightsMissing as e:
        if require_models:
            pytest.fail(f"{case.id}: {e}", pytrace=False)
        pytest.skip(str(e))


@pytest.fixture
def ptq_result(ptq_case: Case, ptq_runner: Runner, ptq_options: Options, request: pytest.FixtureRequest):
    from . import results

    result = run_or_skip(ptq_runner, ptq_case, ptq_options.require_models)
    record = results.record(result.payload, result.quantize_s, result.evaluate_s, ptq_options.settings.device)
    request.node.user_properties += [("quantize_s", round(result.quantize_s, 3)), ("evaluate_s", round(result.evaluate_s, 3)),
                                     (RECORD, record)]  # the baseline check adds its verdict to the record
    return result


class Baseline:
    """``check(result)``: fail on non-finite metrics, then assert against the stored baseline with tolerance."""

    def __init__(self, snapshot, directory: Path, node: pytest.Item | None = None):
        self.extension = BaselineExtension.for_directory(directory)
        self.snapshot = snapshot.use_extension(self.extension)
        self.directory, self.node = directory, node

    def check(self, result) -> None:
        payload = result.payload
        bad = check_finite(payload)
        corrupt = None
        try:
            stored = self._stored()  # before the comparison, which may (under --snapshot-update) rewrite it
        except CorruptBaseline as e:
            stored, corrupt = None, e  # raised after the comparison, once syrupy has counted the file as used
        # Compare first, even for a bad result: syrupy then counts the stored file as used and never deletes it
        # under --snapshot-update; serialize() refuses non-finite metrics, so nothing is written either.
        matched = self.snapshot == payload
        if corrupt is not None:
            raise corrupt
        verdict = compare(stored, payload) if stored is not None else None
        self._annotate(stored, verdict)
        if bad:
            pytest.fail(f"{payload['case']}: non-finite metric(s): {', '.join(bad)}. Nothing was recorded.", pytrace=False)
        if not matched and stored is None:
            pytest.fail(f"{payload['case']}: no baseline for device class {payload['protocol']['device_class']} "
                        f"(looked in {self.directory}); record one with --snapshot-update", pytrace=False)
        if not matched:  # explicit text: pytest only rewrites asserts in test modules, not in this plugin
            pytest.fail("\n".join(verdict.lines + verdict.notes), pytrace=False)
        for note in verdict.notes if verdict else ():
            warnings.warn(BaselineEnvironmentWarning(f"{payload['case']}: {note}"), stacklevel=2)

    def _stored(self) -> dict | None:
        try:
            return json.loads(self.snapshot.extension.read_snapshot(
                test_location=self.snapshot.test_location, index=self.snapshot.index, session_id=""))
        except SnapshotDoesNotExist:
            return None

    def _annotate(self, stored: dict | None, verdict) -> None:
        """Add the comparison to the case's results record (if this test made one)."""
        from . import results

        updating = self.snapshot.update_snapshots
        status = "matched" if verdict is not None and verdict.ok else "recorded" if updating else \
            "missing" if stored is None else "differs"
        for name, record in self.node.user_properties if self.node is not None else ():
            if name == RECORD:
                failed = verdict is not None and not verdict.ok
                record["baseline"] = {"status": status, "lines": verdict.lines if failed else [],
                                      "worse": verdict.worse if failed else [],
                                      "metrics": results.values(stored["metrics"]) if stored else {}}


@pytest.fixture
def ptq_baseline(snapshot, ptq_options: Options, request: pytest.FixtureRequest) -> Baseline:
    return Baseline(snapshot, ptq_options.baselines / ptq_options.settings.device_class, request.node)
