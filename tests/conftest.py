import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.chdir(ROOT)

# Under pytest-xdist (pyproject: two workers) each worker and the processes its tests start use one
# thread: two single-threaded trainings on 2 cores beat two oversubscribed two-thread ones.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")

# Scheduling for pytest-xdist's loadscope (whole modules per worker, --no-loadscope-reorder keeps
# this order): the three modules with a learning check (minutes of CPU training) go first, one to
# each worker and the third next, and inside every module the slow tests run first. xdist hands a
# worker its next module once it has two or fewer tests left, so a long test that ran last in its
# module would have the next module queued behind it while the other worker idles.
FIRST = ["test_mambahunet_bundle.py", "test_mssmamba_bundle.py", "test_msvmunet_bundle.py", "test_model_zoo.py",
         "test_monailabel.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: (rank.get(os.path.basename(str(item.fspath)), len(FIRST)),
                                 item.get_closest_marker("slow") is None))


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory):
    """``mktemp`` for a module's shared fixtures (data sets, trained checkpoints, servers' folders).

    Every folder it made is removed when the module is done. One suite run writes ~10 GB of
    checkpoints (90-140 MB each, optimizer states, exports); kept until the end of the session they
    filled CI's disk (torch.save failed at setup). Per-test ``tmp_path`` folders of passing tests go
    at teardown (pyproject: ``tmp_path_retention_policy = "failed"``).
    """
    made = []

    def mktemp(name):
        path = tmp_path_factory.mktemp(name)
        made.append(path)
        return path

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
