"""The gate's lesion check: the synthetic lesions of a class must have the HU of that class's real lesions.

In CT the lesion's attenuation is what tells the tumor classes apart (phantom: round,
enhancing ~62 HU; necrotic rim ~48 and core ~20), and a lesion is a few per cent of a
slice, so whole-image features and the pooled intensity check can pass a batch whose
lesions are wrong. Measured (bench/RESULTS.md, "Lesion-level gate"): the CycleGAN's MRI->CT
translations kept the tumor masks but drew round lesions at a median 23 HU (real 58) and the
gate accepted them; the dataset they made cost the downstream classifier 0.12 balanced
accuracy on the harder task.

For every item with a mask (manifest label_path) the values inside the mask are pooled per
class, in HU: CT volumes as they are, 2-D patches in [-1, 1] back through the tumor patches'
HU window (pipeline.patches.DEFAULT_TUMOR_HU_WINDOW). The check's value is the largest,
over the classes with masked items on both sides, of the Wasserstein-1 distance (HU) between
the synthetic and the real lesion values of that class (`lesion_hu_max`). Real held-out
phantom lesions score 0.4-2.1 HU against the training ones. MR items and items without a
mask are not scored; with no class scored on both sides the check is reported as not
computed (and passes: there is nothing to compare).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from pipeline.gate.images import GateSet, squeeze_trailing
from pipeline.gate.metrics import intensity_w1
from pipeline.gate.report import CheckResult

log = logging.getLogger(__name__)

INSERTED_LABEL = 2
"""Label value of an inserted lesion in an inserted volume's label map (1 is the host's own lesion;
pipeline/insertion.py writes them, and imports this)."""

def lesion_values_hu(s: GateSet) -> dict[str, NDArray[np.float32]]:
    """Class -> the pooled HU values inside the lesion masks of the set's scored CT items with a mask.

    Only items with scored slices count (so a class subset, `GateSet.subset`, is judged on its
    own items). An item in [-1, 1] is a patch through the tumor patches' HU window; anything
    else is HU already. A synthetic volume whose label map holds INSERTED_LABEL is scored on
    that lesion only (the host's own lesion is real). An item whose mask is empty or does not
    match its image is left out, with a log line.
    """
    from pipeline.patches import DEFAULT_TUMOR_HU_WINDOW
    from pipeline.preprocess import unit_to_ct

    pooled: dict[str, list[NDArray[np.float32]]] = {}
    for index in sorted(set(s.item_of.tolist())):
        item = s.items[index]
        rel = (item.row.get("label_path") or "").strip()
        if item.modality != "CT" or not rel:
            continue
        if not (s.folder / rel).is_file():
            log.warning("lesion check: %s: its mask %s is missing; left out", item.path, rel)
            continue
        img = squeeze_trailing(np.asarray(cast(nib.Nifti1Image, nib.load(item.abs_path)).dataobj, np.float32))
        label = squeeze_trailing(np.asarray(cast(nib.Nifti1Image, nib.load(s.folder / rel)).dataobj))
        if label.shape != img.shape:
            log.warning("lesion check: %s: mask shape %s is not the image's %s; left out", item.path, label.shape, img.shape)
            continue
        mask = label == INSERTED_LABEL if (label == INSERTED_LABEL).any() else label > 0
        if not mask.any():
            continue
        if float(np.abs(img).max()) <= 1.001:  # a patch in [-1, 1] through the tumor window
            img = unit_to_ct(img, DEFAULT_TUMOR_HU_WINDOW)
        pooled.setdefault(item.klass, []).append(img[mask])
    return {k: np.concatenate(v) for k, v in pooled.items()}


def lesion_gate(ref: GateSet, syn: GateSet, max_hu: float | None) -> tuple[CheckResult | None, dict[str, Any]]:
    """The lesion batch check and its metric (per class: W1 in HU, medians, item counts).

    Nothing (None, {}) when `max_hu` is None (the check is off).
    """
    if max_hu is None:
        return None, {}
    real, synth = lesion_values_hu(ref), lesion_values_hu(syn)
    per_class: dict[str, dict[str, float]] = {}
    for klass in sorted(set(real) & set(synth)):
        per_class[klass] = {"w1_hu": intensity_w1(synth[klass], real[klass]), "real_median_hu": float(np.median(real[klass])),
                            "synthetic_median_hu": float(np.median(synth[klass]))}
    if not per_class:
        if synth:
            log.warning("lesion check not computed: no real CT lesion of the synthetic classes (%s)", ", ".join(sorted(synth)))
        detail = ("lesion HU: no class has CT items with a lesion mask on both sides "
                  f"(real: {', '.join(sorted(real)) or 'none'}; synthetic: {', '.join(sorted(synth)) or 'none'}); not computed")
        return CheckResult("lesion", None, max_hu, "<=", True, detail), {"classes": {}}
    worst = max(per_class, key=lambda k: per_class[k]["w1_hu"])
    value = per_class[worst]["w1_hu"]
    detail = "Wasserstein-1 (HU) of the values inside the lesion masks, synthetic vs real, worst class: " + "; ".join(
        f"{k} {v['w1_hu']:.1f} HU (median synthetic {v['synthetic_median_hu']:.0f}, real {v['real_median_hu']:.0f})"
        for k, v in per_class.items())
    return CheckResult("lesion", value, max_hu, "<=", bool(value <= max_hu), detail), {"value": value, "worst_class": worst,
                                                                                      "classes": per_class}
