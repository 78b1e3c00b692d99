"""Test-suite wiring: the ``gpu`` and ``triton`` markers, the device a Triton test runs on, a
replayable random seed, one intra-op thread for engine tests, and the test-only helpers of
``tests/helpers`` (tiny in-memory models, the paged batch builder) importable by module name.

``gpu`` tests need CUDA and are skipped without it. ``triton`` tests run the Triton kernels:
on CUDA when there is a device, else on CPU when the interpreter is on
(``TRITON_INTERPRET=1 python -m pytest -m triton tests/kernels``), else they are skipped.

Random inputs are fresh per run: the run draws one seed (printed in the header and in every
failure's report), and each test derives its own from it and its node id (``seed`` and ``rng``
fixtures). ``python -m pytest --seed N`` replays a run's inputs exactly.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "helpers"))

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--seed",
        type=int,
        default=None,
        help="the run's random seed (default: drawn afresh); a failed run prints the one it used",
    )


def pytest_configure(config: pytest.Config) -> None:
    seed = config.getoption("--seed")
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    elif not 0 <= seed < 2**32:
        raise pytest.UsageError(f"--seed: expected an integer in [0, 2**32), got {seed}")
    config.stash[_RUN_SEED] = seed


_RUN_SEED = pytest.StashKey[int]()


def pytest_report_header(config: pytest.Config) -> str:
    seed = config.stash[_RUN_SEED]
    return f"random seed: {seed} (replay with --seed {seed})"


def test_seed(config: pytest.Config, nodeid: str) -> int:
    """The seed of one test: the run's seed mixed with the test's node id, so a test's inputs
    do not depend on which other tests run (``-k`` replays a single failure too)."""
    return zlib.crc32(nodeid.encode(), config.stash[_RUN_SEED])


test_seed.__test__ = False  # a helper, not a test


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.failed:
        run_seed = item.config.stash[_RUN_SEED]
        replay = (
            f"run seed {run_seed}, this test's {test_seed(item.config, item.nodeid)}: "
            f"replay with `python -m pytest --seed {run_seed} '{item.nodeid}'`"
        )
        report.sections.append(("random seed", replay))
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason="needs CUDA or TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and not (HAS_CUDA or TRITON_INTERPRET):
            item.add_marker(skip_triton)


@pytest.fixture
def triton_device() -> torch.device:
    """Where a ``triton``-marked test runs its kernel: CUDA if present, else the interpreter's
    CPU."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """This test's seed (see the module docstring): fresh per run, replayed by ``--seed``."""
    return test_seed(request.config, request.node.nodeid)


@pytest.fixture(scope="session")
def seed_for(request: pytest.FixtureRequest) -> Callable[[str], int]:
    """``seed_for(key)``: a seed for a fixture of wider scope than a test (a module's prompts,
    say), derived from the run's seed and ``key`` (e.g. the fixture's node id and param)."""
    return lambda key: test_seed(request.config, key)


@pytest.fixture
def rng(seed: int) -> torch.Generator:
    """A generator seeded with this test's ``seed``."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread, as each data-parallel rank process gets on a 2-core machine: the
    same float rounding in a rank and in the single-engine reference, and tiny models gain
    nothing from more threads. Modules of engine tests use it for all their tests with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
