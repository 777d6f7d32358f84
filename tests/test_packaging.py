"""One distribution `mu0` with one import namespace: nothing generic lands in site-packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_everything_under_the_mu0_namespace(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("mu0-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.startswith("mu0-")}
    assert top_level == {"mu0"}
    for module in ("bspline.py", "processing/processing_mu0.py", "dataset_builders/procedural.py", "training/cli.py"):
        assert f"mu0/{module}" in names


def test_modeling_folder_is_flat_and_self_contained():
    """Only single-dot relative imports, so the folder can be copied next to a checkpoint for trust_remote_code."""
    for path in (REPO / "modeling_mu0").glob("*_mu0.py"):
        for line in path.read_text().splitlines():
            assert not line.lstrip().startswith("from .."), f"{path.name}: {line}"
            assert "import mu0" not in line and "from mu0" not in line, f"{path.name}: {line}"
