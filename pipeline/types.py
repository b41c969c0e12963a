"""Named type aliases shared by pipeline/ (units in the names' docs)."""

from typing import Literal

Modality = Literal["CT", "MR"]
"""Imaging modality as written in manifests: DICOM Modality values CT and MR."""

Spacing = tuple[float, float, float]
"""Voxel spacing in mm along the array axes (x, y, z) of a RAS+ canonical volume."""

HUWindow = tuple[float, float]
"""Hounsfield-unit window (low, high) mapped to [-1, 1] for networks."""

Direction = Literal["mri2ct", "ct2mri"]
"""Translation direction of the CycleGAN: MR -> CT (output in HU) or CT -> MR."""

Split = Literal["train", "val", "test"]
"""Subject-level split names used in manifests and datasets."""
