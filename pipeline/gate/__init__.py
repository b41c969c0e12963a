"""The quality gate: is a batch of synthetic images fit to join a training set?

`pipeline.gate.run.run_gate(real, synthetic, out, cfg) -> GateReport` scores a synthetic
folder against the real training folder (FID/KID, precision/recall/density/coverage,
MS-SSIM diversity, duplicates, memorization, intensity, modality), accepts or rejects the
batch naming the failed checks, drops near-copies and outliers one by one, and writes
gate_report.json/.md, PNG figures and accepted.csv. Options: pipeline.gate.config.GateConfig.
Kept free of imports so that reading GateConfig does not load torch.
"""
