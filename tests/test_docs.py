"""Every ```python block in the README and docs/ runs, in order, in a fresh directory."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import FIXTURES, REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def legacy_file(directory: Path) -> None:
    """The docs load ``model_0050.pt``: the real Metta fixture, or a synthesised v2 file without it."""
    fixture = FIXTURES / "v1_era_d_model_0050.pt"
    if fixture.exists():
        shutil.copy(fixture, directory / "model_0050.pt")
        return
    torch.save({"model_state_dict": {"w": torch.ones(3)}, "checkpoint_format_version": 2, "model_type": "brain",
                "name": "model_0050.pt", "uri": "file://model_0050.pt", "metadata": {"epoch": 50}},
               directory / "model_0050.pt")


@pytest.fixture(scope="module")
def s3_bucket() -> Iterator[None]:
    """The docs' ``s3://my-bucket/...`` examples run against moto's S3 server on loopback."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from tests.remote_servers import moto_s3

    with moto_s3("my-bucket"):
        yield


@pytest.mark.parametrize("doc", [d for d in DOCS if BLOCK.search(d.read_text())], ids=lambda p: p.name)
def test_code_blocks_run(
    doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    if "s3://" in "".join(BLOCK.findall(doc.read_text())):
        request.getfixturevalue("s3_bucket")
    legacy_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"doc_{doc.stem}"}
    for i, block in enumerate(BLOCK.findall(doc.read_text())):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                exec(compile(block, f"{doc.name}[block {i}]", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{doc.name} block {i} failed: {type(e).__name__}: {e}\n{block}") from e
    assert os.getcwd() == str(tmp_path)
