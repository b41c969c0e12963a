"""The tumor GAN under torchrun: 2 CPU processes with the gloo backend.

Run by pytest, the test starts torchrun on this same file; run by torchrun, the file is one rank:
it trains a tiny tumor GAN 4 steps uninterrupted, then 2 steps and a resume to 4, and writes
OUT/rank<r>.json with a sha256 of the trained weights. Both ranks must hold identical weights
(gradients are averaged), share one ADA probability, draw their own batches, and resume exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(patch_size=16, latent_dim=8, g_channels=4, d_channels=4, batch_size=4, log_every=1, sample_every=0,
           diversity_samples=2, ema_decay=0.9, minibatch_std=True, mode_seeking_weight=1.0,
           diffaug=["translation"], ada_target=0.6, ada_interval=1, ada_speed_images=40)


def _weights_sha(result: object) -> str:
    h = hashlib.sha256()
    for net in (result.generator, result.discriminator):  # type: ignore[attr-defined]
        for _, p in sorted(net.named_parameters()):
            h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _rank_main(out: Path) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT / "tests"))
    from test_tumor_gan_data import tiny_patch_data

    from models.train_tumor_gan import TumorGANConfig, train_tumor_gan

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = tiny_patch_data(n=6, size=16)
    full = train_tumor_gan(TumorGANConfig.model_validate(CFG | {"steps": 4}), data, out / "full", device="cpu")
    train_tumor_gan(TumorGANConfig.model_validate(CFG | {"steps": 2}), data, out / "split", device="cpu")
    resumed = train_tumor_gan(TumorGANConfig.model_validate(CFG | {"steps": 4}), data, out / "split", resume=True, device="cpu")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "world_size": dist.get_world_size(),
        "weights_full": _weights_sha(full),
        "weights_resumed": _weights_sha(resumed),
        "history_full": full.history,
        "history_resumed": resumed.history,
    }))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_hold_identical_weights_and_resume_exactly(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["weights_full"] == r1["weights_full"], "gradients are averaged: one model on both ranks"
    assert r0["weights_resumed"] == r0["weights_full"] and r1["weights_resumed"] == r1["weights_full"]
    assert len(r0["history_full"]) == 4 and r1["history_full"] == [], "only rank 0 logs"
    assert len(r0["history_resumed"]) == 2
    for resumed, full in zip(r0["history_resumed"], r0["history_full"][2:], strict=True):
        assert resumed == pytest.approx(full, rel=1e-6)
    from models.checkpoint import load_checkpoint
    from models.common import read_metrics

    assert len(read_metrics(tmp_path / "full")) == 4
    ckpt = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2
    assert not torch.equal(ckpt["ranks"][0]["data_rng"], ckpt["ranks"][1]["data_rng"]), "each rank draws its own batches"
    assert ckpt["ranks"][0]["ada"]["p"] == ckpt["ranks"][1]["ada"]["p"] > 0, "one ADA probability for all ranks"


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]))
