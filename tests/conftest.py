import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Child processes (the CLI run as a subprocess, mpirun's ranks) see a fixed terminal: no colour, 120
# columns, whatever the environment the suite runs in (FORCE_COLOR in CI, a narrow COLUMNS).
for _var in ("FORCE_COLOR", "CLICOLOR_FORCE", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
    os.environ.pop(_var, None)
os.environ.update(NO_COLOR="1", COLUMNS="120", TERM="dumb")

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SAMPLE_VARIANTS = sorted(p.name for p in SAMPLES.iterdir() if (p / "tp2").is_dir())


@pytest.fixture(autouse=True)
def console_width(monkeypatch):
    """Pin the CLI's consoles to 120 columns, no colour and no terminal, so assertions do not depend on
    the terminal (or CI's lack of one, or FORCE_COLOR/COLUMNS in its environment). Returns a setter for
    tests that check narrow terminals."""
    from preserve_onnx import cli

    for console in (cli.out, cli.err):
        monkeypatch.setattr(console, "_color_system", None)
        monkeypatch.setattr(console, "_force_terminal", False)

    def set_width(columns: int) -> None:
        monkeypatch.setattr(cli.out, "_width", columns)
        monkeypatch.setattr(cli.err, "_width", columns)

    set_width(120)
    return set_width


@pytest.fixture
def sample_copy(tmp_path):
    """Copy a sample variant's tp2 directory into tmp_path (tests never touch the committed files)."""
    import shutil

    def make(variant: str = "llama-gqa") -> Path:
        dest = tmp_path / variant
        shutil.copytree(SAMPLES / variant / "tp2", dest)
        return dest

    return make


# Hypothesis profiles for tests/test_properties.py: "ci" (default; fixed seed, bounded so `make test`
# stays fast) and "fuzz" (`make fuzz`: fresh seeds, many examples). Pick with --hypothesis-profile=NAME
# or HYPOTHESIS_PROFILE=NAME.

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=_SLOW_OK,
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    database=None,
    deadline=None,
    max_examples=1_000_000,
    suppress_health_check=_SLOW_OK,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
