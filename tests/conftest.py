from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
SAMPLE_VARIANTS = sorted(p.name for p in SAMPLES.iterdir() if (p / "tp2").is_dir())


@pytest.fixture
def sample_copy(tmp_path):
    """Copy a sample variant's tp2 directory into tmp_path (tests never touch the committed files)."""
    import shutil

    def make(variant: str = "llama-gqa") -> Path:
        dest = tmp_path / variant
        shutil.copytree(SAMPLES / variant / "tp2", dest)
        return dest

    return make
