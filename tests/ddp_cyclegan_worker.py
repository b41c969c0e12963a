"""One rank of the 2-process DDP test (tests/test_cyclegan_train.py), started by torchrun.

Joins the gloo process group, then trains a tiny CycleGAN on CPU three times: 4 steps
uninterrupted, 2 steps with a checkpoint, and a resume of that run to 4 steps. Writes
OUT/rank<r>.json with a sha256 of all four networks' weights after each run and the logged
losses, so the test can check that both ranks hold identical weights and that a DDP resume
continues exactly.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from models.train_cyclegan import CycleGANConfig, TrainResult, UnpairedData, build_nets, train_cyclegan


def weights_sha(result: TrainResult) -> str:
    digest = hashlib.sha256()
    for _, net in result.nets.items():
        for _, v in sorted(net.state_dict().items()):
            digest.update(v.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    data = UnpairedData(a=[torch.rand(1, 32, 32, generator=g) * 2 - 1 for _ in range(8)],
                        b=[torch.rand(1, 32, 32, generator=g) * 2 - 1 for _ in range(8)])
    cfg = CycleGANConfig(image_size=32, ngf=8, ndf=8, n_res_blocks=2, batch_size=2, steps=4, log_every=1,
                         checkpoint_every=100, sample_every=1000, eval_every=1000, pool_size=2, ema_decay=0.9,
                         diffaug=["translation", "cutout"], ada_target=0.6, ada_interval=1, ada_speed_images=8,
                         lr_d=2e-2)  # a fast D, so ADA's p moves within 4 steps
    full = train_cyclegan(cfg, data, out / "full", device="cpu")
    train_cyclegan(cfg.model_copy(update={"steps": 2, "checkpoint_every": 2}), data, out / "split", device="cpu")
    rest = train_cyclegan(cfg.model_copy(update={"checkpoint_every": 2}), data, out / "split", resume=True, device="cpu")
    init = build_nets(cfg).g_mri2ct.state_dict()
    moved = any(not torch.equal(v, full.nets.g_mri2ct.state_dict()[k]) for k, v in init.items())
    report: dict[str, Any] = {
        "rank": rank, "world_size": world_size, "moved": moved,
        "weights_full": weights_sha(full), "weights_resumed": weights_sha(rest),
        "losses_full": [[r["loss_g"], r["loss_d"], r["aug_p"]] for r in full.history],
        "losses_resumed": [[r["loss_g"], r["loss_d"], r["aug_p"]] for r in rest.history],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
