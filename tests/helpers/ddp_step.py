"""Two training steps on fixed synthetic data, single process or one rank of torchrun.

Run directly (``python ddp_step.py OUT``) for the single-process reference, or under
``torchrun --nproc_per_node 2`` for distributed; rank 0 saves the resulting weights to OUT.
"""

import sys

import torch
from torch.utils.data import DataLoader, DistributedSampler

from cmn.config import ModelConfig
from cmn.data.dataset import collate
from cmn.engine import train_one_epoch
from cmn.model import build_model
from cmn.runtime import init_distributed, seed_everything

GLOBAL_BATCH = 4


def synthetic_items(n=8, vocab=20):
    g = torch.Generator().manual_seed(123)
    items = []
    for i in range(n):
        length = 4 + i % 4  # different lengths: the loss must weight tokens globally
        targets = torch.randint(1, vocab, (length,), generator=g)
        targets[0] = 0
        targets[-1] = 0
        items.append(
            {
                "id": f"s{i}",
                "images": torch.randn(2, 3, 32, 32, generator=g),
                "targets": targets,
                "mask": torch.ones(length),
            }
        )
    return items


def main(out: str) -> None:
    info = init_distributed()
    seed_everything(0)
    cfg = ModelConfig(
        vocab_size=20,
        visual_extractor="resnet18",
        d_model=32,
        d_ff=32,
        num_heads=4,
        num_layers=1,
        memory_size=16,
        topk=4,
        num_views=2,
        dropout=0.0,
        attention_dropout=0.0,
        drop_prob_lm=0.0,
    )
    model = build_model(cfg)
    net = model
    if info.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    data = synthetic_items()
    sampler = DistributedSampler(data, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // info.world_size, sampler=sampler, collate_fn=collate)
    # SGD: parameters move by lr * gradient, so equal parameters mean equal gradients (Adam would
    # amplify float summation-order noise in near-zero gradients)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(net, loader, opt, torch.device("cpu"), world_size=info.world_size, freeze_bn=True)
    if info.rank == 0:
        torch.save({"state": model.state_dict(), "stats": stats}, out)
    if info.world_size > 1:
        torch.distributed.barrier()  # both ranks are done before either tears down
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
