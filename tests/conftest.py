import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    """The known third-party warnings the driver and workers silence (``unlearn_search.quiet``),
    silenced here too, by name; every other warning, deprecations included, shows in the summary.
    Hypothesis explores new inputs on each local run, and replays the same ones in CI (``CI`` set),
    so a CI run passes or fails on the code alone."""
    from hypothesis import settings

    from unlearn_search.quiet import silence_known_warnings

    silence_known_warnings()
    settings.register_profile("ci", derandomize=True)
    settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(scope="session")
def data_paths():
    from unlearn_search.data import resolve_data

    if not (SHARED_DATA / "semeval25").exists():
        pytest.skip("../shared/data is not beside the checkout")
    return resolve_data(SHARED_DATA)


@pytest.fixture(scope="session")
def tiny_target(data_paths):
    """The tiny reference target, built once per machine (cached, keyed by data and settings)."""
    from unlearn_search.models import PRESETS, build_target

    return build_target(data_paths, PRESETS["tiny"], progress=False)
