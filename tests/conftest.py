import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.chdir(ROOT)

# Under pytest-xdist (pyproject: two workers) each worker and the processes its tests start use one
# thread: two single-threaded trainings on 2 cores beat two oversubscribed two-thread ones.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")

# The longest modules (each holds a learning check: minutes of CPU training) are scheduled first and
# interleaved with a short one, so that with --dist loadscope the two workers start with one and two
# of them respectively instead of one worker getting two of the longest at the end.
FIRST = ["test_mambahunet_bundle.py", "test_mssmamba_bundle.py", "test_demo.py", "test_msvmunet_bundle.py",
         "test_model_zoo.py", "test_monailabel.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(FIRST)))
