"""Ingest: DICOM folders, NIfTI files and Decathlon datasets -> de-identified canonical NIfTI.

`run_ingest(sources, out, modality=None, key=None)` writes out/volumes, out/labels,
manifest.csv, quarantine.csv and ingest_report.json (see pipeline.ingest.run). Everything
downstream reads that folder.
"""

from pipeline.ingest.run import MANIFEST_COLUMNS, QUARANTINE_COLUMNS, IngestReport, locate, run_ingest

__all__ = ["MANIFEST_COLUMNS", "QUARANTINE_COLUMNS", "IngestReport", "locate", "run_ingest"]
