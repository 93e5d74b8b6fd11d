"""The README stays true: its config reference is the schema's, and what it points to exists."""

from __future__ import annotations

import re

from tests.support import REPO
from trainer.config import load_config, reference_markdown


def readme() -> str:
    return (REPO / "README.md").read_text()


def test_readme_config_reference_is_generated_from_the_schema():
    text = readme()
    block = text.split("<!-- config-reference:start -->")[1].split("<!-- config-reference:end -->")[0]
    assert block.strip() == reference_markdown().strip(), "run: python -m trainer.config --reference"


def test_every_bundled_config_loads():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert {c.name for c in configs} >= {"demo.yaml", "ffhq64.yaml", "mnist32.yaml"}
    for path in configs:
        load_config(path)


def test_files_the_readme_names_exist():
    for name in set(re.findall(r"(?:configs|launch|benchmarks|docs)/[\w./-]+\.(?:yaml|sh|sbatch|py|png|md)", readme())):
        assert (REPO / name).exists(), name
    assert (REPO / ".ci" / "run").stat().st_mode & 0o111
    assert (REPO / "launch" / "gpu_check.sh").stat().st_mode & 0o111
