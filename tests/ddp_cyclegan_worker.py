"""One rank of the 2-process DDP test (tests/test_cyclegan_train.py), started by torchrun.

Trains a tiny CycleGAN for 3 steps on CPU with the gloo backend and writes OUT/rank<r>.json
with a sha256 of all four networks' weights, so the test can check that both ranks hold
identical weights after training.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from models.train_cyclegan import CycleGANConfig, UnpairedData, build_nets, train_cyclegan


def main(out: Path) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    g = torch.Generator().manual_seed(0)
    data = UnpairedData(a=[torch.rand(1, 32, 32, generator=g) * 2 - 1 for _ in range(8)],
                        b=[torch.rand(1, 32, 32, generator=g) * 2 - 1 for _ in range(8)])
    cfg = CycleGANConfig(image_size=32, ngf=8, ndf=8, n_res_blocks=2, batch_size=2, steps=3, log_every=1,
                         checkpoint_every=3, sample_every=1000, eval_every=1000)
    world_size = int(os.environ["WORLD_SIZE"])
    result = train_cyclegan(cfg, data, out / "run", device="cpu")
    digest = hashlib.sha256()
    for _, net in result.nets.items():
        for _, v in sorted(net.state_dict().items()):
            digest.update(v.detach().contiguous().numpy().tobytes())
    init = build_nets(cfg).g_mri2ct.state_dict()
    moved = any(not torch.equal(v, result.nets.g_mri2ct.state_dict()[k]) for k, v in init.items())
    report = {"rank": rank, "world_size": world_size, "weights": digest.hexdigest(),
              "loss_g": result.history[0]["loss_g"], "moved": moved}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
