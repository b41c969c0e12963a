"""How the dataset writer writes an image file (pipeline.dataset.writer.write_nifti_gz): a
reproducible .nii.gz is copied byte for byte and hashed once, checked against its manifest's
sha256; anything else is recompressed with ingest's deflate; bad files are refused."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.dataset.writer import CANONICAL_GZIP_HEAD, write_nifti_gz
from pipeline.errors import InputRejected
from pipeline.ingest.writer import write_volume


def _nifti_bytes() -> bytes:
    img = nib.Nifti1Image(np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4), np.diag([0.8, 0.8, 2.0, 1.0]))
    return bytes(img.to_bytes())


def test_ingest_file_is_copied_and_checked_against_its_manifest_hash(tmp_path: Path) -> None:
    src = tmp_path / "ingest.nii.gz"
    write_volume(src, np.arange(8 * 8 * 4, dtype=np.int16).reshape(8, 8, 4), np.eye(4), level=1)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert write_nifti_gz(src, tmp_path / "a.nii.gz", sha) == sha
    assert (tmp_path / "a.nii.gz").read_bytes() == src.read_bytes()
    assert write_nifti_gz(src, tmp_path / "b.nii.gz") == sha  # no manifest hash: the same copy
    with pytest.raises(InputRejected, match="changed since its manifest was written"):
        write_nifti_gz(src, tmp_path / "c.nii.gz", "0" * 64)


@pytest.mark.parametrize("kind", ["plain", "named gzip"])
def test_other_files_are_recompressed_reproducibly(tmp_path: Path, kind: str) -> None:
    data = _nifti_bytes()
    src = tmp_path / ("x.nii" if kind == "plain" else "x.nii.gz")
    if kind == "plain":
        src.write_bytes(data)
    else:  # a gzip header with a file name and a time, as gzip(1) writes: not copied
        buf = io.BytesIO()
        with gzip.GzipFile("patient-name.nii", "wb", fileobj=buf, mtime=1_700_000_000) as gz:
            gz.write(data)
        src.write_bytes(buf.getvalue())
    sha = write_nifti_gz(src, tmp_path / "out.nii.gz")
    out = (tmp_path / "out.nii.gz").read_bytes()
    assert out[:8] == CANONICAL_GZIP_HEAD and b"patient-name" not in out
    assert gzip.decompress(out) == data and sha == hashlib.sha256(out).hexdigest()
    assert write_nifti_gz(src, tmp_path / "again.nii.gz") == sha


def test_bad_files_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.nii"
    text.write_bytes(b"not a nifti header at all" * 40)
    with pytest.raises(InputRejected, match="not a readable NIfTI"):
        write_nifti_gz(text, tmp_path / "o.nii.gz")
    truncated = tmp_path / "cut.nii.gz"
    whole = gzip.compress(_nifti_bytes(), mtime=0)
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputRejected, match="not a readable gzip stream"):
        write_nifti_gz(truncated, tmp_path / "o.nii.gz")


def test_dataset_images_keep_their_input_hashes(tmp_path: Path) -> None:
    """Every image of a built dataset is its input file's bytes, with that file's sha256 (never recompressed)."""
    import importlib.util

    from pipeline.manifest import read_manifest

    spec = importlib.util.spec_from_file_location("_dataset_builders", Path(__file__).with_name("test_dataset.py"))
    assert spec is not None and spec.loader is not None
    builders = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builders)
    out, inputs = builders.build_tumor_dataset(tmp_path, max_synthetic_share=0.9)
    given = {hashlib.sha256((folder / r["path"]).read_bytes()).hexdigest()
             for folder in (inputs["real"], inputs["synthetic"]) for r in read_manifest(folder)}
    rows = read_manifest(out)
    assert rows and {r["sha256"] for r in rows} <= given
    for r in rows:
        assert hashlib.sha256((out / r["path"]).read_bytes()).hexdigest() == r["sha256"]
