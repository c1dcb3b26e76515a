"""Distributed data-parallel training of a BinaryViT on CPU, the way timm's train.py does it.

The test launches this file with ``torchrun --nproc_per_node=2`` (``python -m
torch.distributed.run``, rendezvous on 127.0.0.1 and a free port), exactly as one would
launch ``train.py`` on a multi-GPU node. Each worker goes through timm's own distributed
path: ``timm.utils.init_distributed_device_so`` (gloo on CPU), ``timm.data.create_loader(...,
distributed=True)`` (a ``DistributedSampler``: every rank reads a different shard of the
digits), ``ClassificationTask.prepare_distributed`` (``DistributedDataParallel``),
``create_optimizer_v2``, and at the end ``timm.utils.distribute_bn(..., reduce=True)``
(train.py's ``--dist-bn reduce``). The parent then checks that the ranks hold identical
weights, read disjoint shards, and that the loss went down.

SyncBatchNorm: ``convert_sync_batchnorm`` (train.py's ``--sync-bn``) must convert every token
BatchNorm of the model. Its synchronising forward only runs on accelerator tensors in
PyTorch (on CPU it raises "SyncBatchNorm expected input tensor to be on GPU ..."), so on CPU
the workers probe it, record the outcome, and train with per-rank BatchNorm; where the
probe succeeds (a future PyTorch, or an accelerator) they train with SyncBatchNorm.
"""
import copy
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD_SIZE = 2
EPOCHS = 2
BATCH_SIZE = 32
STUDENT_ARGS = dict(
    embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4), mlp_ratios=(2, 2, 2, 2),
    sr_ratios=(2, 2, 1, 1), img_size=32, in_chans=1, num_classes=10,
)
DATA_CFG = dict(input_size=(1, 32, 32), mean=(0.5,), std=(0.5,), crop_pct=1.0, interpolation='bilinear')


def _create_model():
    import timm
    import timm_binaryvit  # noqa: F401
    return timm.create_model('binaryvit_small_patch4_224', pretrained_cfg_overlay=dict(DATA_CFG), **STUDENT_ARGS)


def _count_bn(model):
    bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm)
             for m in model.modules())
    sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    return bn, sync


# ------------------------------------------------------------------------------------------
# Worker (run by torchrun)


def worker(out_dir: str, data_root: str) -> None:
    from timm.data import create_dataset, create_loader
    from timm.optim import create_optimizer_v2
    from timm.task import ClassificationTask
    from timm.utils import distribute_bn, random_seed
    from timm.utils.distributed import init_distributed_device_so

    torch.set_num_threads(1)
    info = init_distributed_device_so(device='cpu')  # env:// from torchrun, gloo for CPU
    assert info['distributed'], info
    rank, world_size = info['global_rank'], info['world_size']
    dist = torch.distributed
    assert dist.get_backend() == 'gloo'

    # A different seed on every rank: DistributedDataParallel must broadcast rank 0's weights.
    random_seed(100 + rank)
    model = _create_model()
    n_bn, _ = _count_bn(model)

    # --sync-bn: conversion, then one training forward to see if the sync path runs here.
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    bn_left, n_sync = _count_bn(converted)
    converted.train()
    try:
        converted(torch.randn(4, 1, 32, 32))
        sync_error = None
    except (ValueError, RuntimeError) as e:
        sync_error = f'{type(e).__name__}: {e}'
    use_sync_bn = sync_error is None
    if use_sync_bn:
        model = converted
    del converted

    dataset = create_dataset('', root=data_root, split='train', is_training=True, input_img_mode='L')
    loader = create_loader(
        dataset, input_size=DATA_CFG['input_size'], batch_size=BATCH_SIZE, is_training=True,
        scale=(0.7, 1.0), ratio=(0.8, 1.25), hflip=0.0, color_jitter=None,
        interpolation=DATA_CFG['interpolation'], mean=DATA_CFG['mean'], std=DATA_CFG['std'],
        num_workers=0, distributed=True, use_prefetcher=False, device=torch.device('cpu'))
    assert isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler)
    loader.sampler.set_epoch(0)
    shard = list(iter(loader.sampler))

    task = ClassificationTask(model, verbose=False)
    task.prepare_distributed(device_ids=None)  # CPU: no device ids
    assert isinstance(task.trainable_module, torch.nn.parallel.DistributedDataParallel)
    optimizer = create_optimizer_v2(model, opt='adamw', lr=2e-3, weight_decay=0.0)

    losses = []
    t0 = time.time()
    for epoch in range(EPOCHS):
        loader.sampler.set_epoch(epoch)
        task.train()
        for input, target in loader:
            loss = task(input, target)['loss']
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    train_time = time.time() - t0

    distribute_bn(model, world_size, reduce=True)  # train.py --dist-bn reduce

    # In-process check: all ranks gather every rank's flattened parameters.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    max_param_diff = max((g - flat).abs().max().item() for g in gathered)

    torch.save(model.state_dict(), Path(out_dir) / f'rank{rank}.pt')
    with open(Path(out_dir) / f'rank{rank}.json', 'w') as f:
        json.dump(dict(
            rank=rank, world_size=world_size, losses=losses, shard=shard, dataset_len=len(dataset),
            steps=len(losses), train_time_s=train_time, max_param_diff_all_gather=max_param_diff,
            n_bn=n_bn, n_sync_after_convert=n_sync, bn_left_after_convert=bn_left,
            sync_bn_error=sync_error, used_sync_bn=use_sync_bn,
        ), f)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# Tests


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _load_example():
    spec = importlib.util.spec_from_file_location('train_digits', REPO_ROOT / 'examples' / 'train_digits.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('ddp')
    data_root = tmp / 'digits'
    _load_example().export_digits(data_root)
    out_dir = tmp / 'out'
    out_dir.mkdir()
    cmd = [
        sys.executable, '-m', 'torch.distributed.run',
        f'--nproc_per_node={WORLD_SIZE}', '--nnodes=1',
        '--master_addr=127.0.0.1', f'--master_port={_free_port()}',
        str(Path(__file__).resolve()), '--worker', str(out_dir), str(data_root),
    ]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=str(REPO_ROOT))
    wall = time.time() - t0
    assert proc.returncode == 0, f'torchrun failed ({proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}'
    ranks = []
    for r in range(WORLD_SIZE):
        with open(out_dir / f'rank{r}.json') as f:
            meta = json.load(f)
        meta['state_dict'] = torch.load(out_dir / f'rank{r}.pt', map_location='cpu')
        ranks.append(meta)
    print(f'\ntorchrun wall time {wall:.1f}s, {ranks[0]["steps"]} steps per rank, '
          f'used SyncBatchNorm: {ranks[0]["used_sync_bn"]} ({ranks[0]["sync_bn_error"]})')
    return ranks


@pytest.mark.slow
def test_ranks_hold_identical_weights(ddp_run):
    ref = ddp_run[0]['state_dict']
    for other in ddp_run[1:]:
        sd = other['state_dict']
        assert sd.keys() == ref.keys()
        for k in ref:
            # Parameters are synchronised by DDP every step; BN running statistics by distribute_bn(reduce=True).
            assert torch.equal(sd[k], ref[k]), f'{k} differs between ranks'
    assert all(r['max_param_diff_all_gather'] == 0.0 for r in ddp_run)


@pytest.mark.slow
def test_ranks_read_different_shards(ddp_run):
    shards = [set(r['shard']) for r in ddp_run]
    n = ddp_run[0]['dataset_len']
    assert set().union(*shards) == set(range(n))
    # DistributedSampler pads to a multiple of the world size by repeating a few indices.
    assert len(shards[0] & shards[1]) <= WORLD_SIZE - 1
    assert len(ddp_run[0]['shard']) == len(ddp_run[1]['shard'])
    # different data, hence different losses on the two ranks
    assert ddp_run[0]['losses'] != ddp_run[1]['losses']


@pytest.mark.slow
def test_loss_goes_down(ddp_run):
    for r in ddp_run:
        losses = r['losses']
        assert len(losses) >= 2 * 10
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.7 * first, (first, last)


@pytest.mark.slow
def test_sync_batchnorm_under_ddp(ddp_run):
    for r in ddp_run:
        # --sync-bn converts every token BatchNorm, none left behind
        assert r['n_bn'] > 0
        assert r['n_sync_after_convert'] == r['n_bn']
        assert r['bn_left_after_convert'] == 0
        if not r['used_sync_bn']:
            # PyTorch's SyncBatchNorm only synchronises accelerator tensors (CUDA / XPU / HPU / privateuse1)
            assert 'SyncBatchNorm expected input tensor to be on GPU' in r['sync_bn_error']


def test_sync_batchnorm_conversion_keeps_outputs():
    """Outside a process group SyncBatchNorm falls back to BatchNorm: the same outputs and statistics."""
    torch.manual_seed(0)
    model = _create_model()
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    n_bn, _ = _count_bn(model)
    assert _count_bn(converted) == (0, n_bn)
    x = torch.randn(4, 1, 32, 32)
    for mode in (True, False):
        model.train(mode)
        converted.train(mode)
        # same arithmetic; only float rounding of the matmuls may differ (buffer alignment in MKL)
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    for (k, a), (k2, b) in zip(model.state_dict().items(), converted.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


if __name__ == '__main__':
    if len(sys.argv) == 4 and sys.argv[1] == '--worker':
        worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit('usage: torchrun --nproc_per_node=2 tests/test_distributed.py --worker OUT_DIR DATA_ROOT')
