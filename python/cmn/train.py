"""The training run behind ``cmn-train``: data, vocabulary, model, loop, checkpoints, scores.

Single process, or one process per GPU under ``torchrun`` (DistributedDataParallel; gloo on
CPU, NCCL on CUDA). Rank 0 validates, writes checkpoints and logs; the others wait.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, cast

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from cmn.config import DataConfig, ModelConfig, TrainConfig
from cmn.errors import CheckpointError, CMNError, ConfigError
from cmn.fsutil import remove_stale_temps, write_atomic, write_json
from cmn.runtime import DistInfo, init_distributed, rng_state, seed_everything, select_device, set_rng_state

DEMO_CACHE_ENV = "CMN_DEMO_DIR"
LOG = "log.jsonl"
# What a run leaves in its folder; a new run refuses to mix with these unless --resume/--overwrite.
RUN_FILES = (
    "checkpoint",
    "last",
    ".checkpoint.previous",
    ".last.previous",
    LOG,
    "metrics.json",
    "test_predictions.jsonl",
)


def default_demo_dir() -> Path:
    env = os.environ.get(DEMO_CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cmn" / "demo-v1"


def resolve_data_paths(data: DataConfig) -> tuple[Path, Path]:
    """(annotation file, image folder), generating the demo data when needed."""
    if data.demo_size is not None and data.ann_path is None:
        from cmn.data.demo import ensure_demo_data

        n_train, n_val, n_test = data.demo_size
        return ensure_demo_data(default_demo_dir(), n_train=n_train, n_val=n_val, n_test=n_test)
    if data.ann_path is None or data.image_dir is None:
        raise ConfigError(f"--dataset {data.dataset} needs --ann-path FILE and --image-dir DIR")
    ann, img = Path(data.ann_path), Path(data.image_dir)
    if not ann.is_file():
        raise ConfigError(f"--ann-path {ann}: no such file")
    if not img.is_dir():
        raise ConfigError(f"--image-dir {img}: no such folder")
    return ann, img


def _claim_run_folder(out_dir: Path, train: TrainConfig, dist_info: DistInfo) -> None:
    """A run folder holds one run: refuse another unless --resume or --overwrite; remove the
    temporary folders killed saves left behind."""
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not (train.resume or train.overwrite):
        raise ConfigError(
            f"--output-dir {out_dir}: already holds a run ({', '.join(existing)}); pass --resume to "
            "continue it, --overwrite to replace it, or choose another folder"
        )
    if dist_info.is_main:
        if train.overwrite and not train.resume:
            for name in existing:
                p = out_dir / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for name in ("checkpoint", "last"):
            remove_stale_temps(out_dir / name)
    if dist_info.world_size > 1:
        dist.barrier()


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--output-dir {folder}: not writable ({e.strerror or e})") from None


def most_frequent_report(reports: list[str]) -> str:
    """The baseline: always write the most frequent (cleaned) training report."""
    counts = collections.Counter(reports)
    return max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]


class _Log:
    def __init__(self, enabled: bool, quiet: bool):
        self.enabled, self.quiet = enabled, quiet

    def __call__(self, msg: str) -> None:
        if self.enabled and not self.quiet:
            print(msg, file=sys.stderr, flush=True)


@dataclass
class _Run:
    """Everything one training run holds between its phases."""

    data: DataConfig
    train: TrainConfig
    model_cfg: ModelConfig
    dist: DistInfo
    device: torch.device
    out_dir: Path
    ann_path: Path
    splits: dict
    tokenizer: Any
    model: torch.nn.Module
    net: torch.nn.Module  # the model, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: Any  # EpochSampler over a DistributedSampler
    train_loader: DataLoader
    eval_loaders: dict
    log: _Log
    progress: bool
    start_epoch: int = 1
    best_score: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    best_val: dict = field(default_factory=dict)
    val_truth: Optional[dict] = None  # demo data: drawn findings of the validation split, read once
    warmup: list = field(default_factory=list)  # visual warm-up records (this process's run only)

    @property
    def best_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    @property
    def last_dir(self) -> Path:
        return self.out_dir / "last"

    @property
    def data_info(self) -> dict[str, Any]:
        d = self.data
        return {
            "dataset": d.dataset,
            "clean_rule": d.clean_rule,
            "image_size": d.image_size,
            "num_views": d.num_views,
            "max_seq_length": d.max_seq_length,
            "threshold": d.threshold,
        }

    @property
    def clinical(self) -> bool:
        return self.data.clinical

    @property
    def eval_kw(self) -> dict[str, Any]:
        t = self.train
        return dict(
            beam_size=t.beam_size,
            block_ngram=t.block_ngram,
            precision=t.precision,
            max_batches=t.eval_max_batches,
            decode=t.decode,
        )


def run_training(
    data: DataConfig,
    model_kwargs: dict[str, Any],
    train: TrainConfig,
    *,
    progress: bool = True,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train, select on the validation ``train.monitor`` score, test the best model; returns what
    metrics.json holds.

    ``model_kwargs`` are :class:`ModelConfig` fields except ``vocab_size`` (known once the
    vocabulary is built). With ``train.resume`` the run continues from
    ``output_dir/last`` (weights, optimizer, scheduler, epoch, RNG states).
    """
    from cmn.metrics import NLGScorer

    if train.monitor.startswith("CE_") and not data.clinical:  # the score would be missing: epoch 1 kept
        raise ConfigError(f"--monitor {train.monitor}: the {data.dataset} preset does not score clinical efficacy")
    if train.low_memory:  # one switch for the two settings that cut a training step's peak memory most
        train = replace(train, precision="bf16", checkpoint_visual=True)
    run = _prepare(data, model_kwargs, train, progress, _Log(True, quiet))
    result: dict[str, Any] = {}
    with NLGScorer() as scorer:  # one METEOR process for the whole run
        epochs_run, seconds = _fit(run, scorer)
        if run.dist.is_main:
            result = _test(run, scorer, epochs_run, seconds)
    if run.dist.world_size > 1:
        dist.barrier()
    return result


def _prepare(data: DataConfig, model_kwargs: dict[str, Any], train: TrainConfig, progress: bool, log: _Log) -> _Run:
    from cmn import checkpoint as ckpt
    from cmn.data.annotation import drop_empty_reports, load_annotation
    from cmn.data.cache import ImageCache
    from cmn.data.dataset import EpochSampler, ReportDataset, collate
    from cmn.data.images import build_transform
    from cmn.model import build_model
    from cmn.text import Tokenizer, clean_report

    dist_info = init_distributed()
    log.enabled = dist_info.is_main
    device = select_device(train.device, dist_info.local_rank)
    out_dir = Path(train.output_dir)
    if dist_info.is_main:
        check_writable(out_dir)
    last_dir = out_dir / "last"
    _claim_run_folder(out_dir, train, dist_info)

    # ---- data and vocabulary -------------------------------------------------------------
    ann_path, image_dir = resolve_data_paths(data)
    splits = load_annotation(ann_path)
    rule = data.clean_rule
    for name in ("train", "val", "test"):
        kept, dropped = drop_empty_reports(splits[name], lambda r: clean_report(r, rule))
        if dropped:
            log(f"warning: {ann_path}: dropped {dropped} {name} studies with an empty report")
        if not kept:
            raise CMNError(f"{ann_path}: split {name!r} has no study with a non-empty report")
        splits[name] = kept

    trainer_state = None
    if train.resume:
        ckpt.resolve_bundle(last_dir)  # clear error when there is nothing to resume
        saved = ckpt.read_config(last_dir)["model"]
        tokenizer = ckpt.load_tokenizer(last_dir)
        trainer_state = ckpt.load_trainer_state(last_dir, trust_legacy_pickle=train.trust_pickled_state)
        model_cfg = ModelConfig.from_dict(saved)
        requested = dict(model_kwargs, vocab_size=model_cfg.vocab_size)
        differs = {k: (saved[k], v) for k, v in requested.items() if saved.get(k) != v and k != "memory_impl"}
        if differs:
            desc = ", ".join(f"{k}: {a!r} in the checkpoint vs {b!r} now" for k, (a, b) in sorted(differs.items()))
            raise ConfigError(f"--resume: {last_dir} was trained with other model settings ({desc})")
        model_cfg = replace(model_cfg, memory_impl=model_kwargs.get("memory_impl", model_cfg.memory_impl))
    elif train.init_from:
        tokenizer = ckpt.load_tokenizer(train.init_from)  # the vocabulary the weights were trained with
        model_cfg = ModelConfig(vocab_size=len(tokenizer), **model_kwargs)
        if tokenizer.dataset != rule:
            log(f"note: {train.init_from} cleans reports with the {tokenizer.dataset} rule; this data uses {rule}")
    else:
        tokenizer = Tokenizer.build([s.report for s in splits["train"]], data.threshold, rule)
        model_cfg = ModelConfig(vocab_size=len(tokenizer), **model_kwargs)
    log(f"data: {ann_path} ({', '.join(f'{k} {len(v)}' for k, v in splits.items())}), vocabulary {len(tokenizer)} ids")

    cache = ImageCache(data.image_cache) if data.image_cache else None

    def dataset(split: str, is_train: bool) -> ReportDataset:
        return ReportDataset(
            splits[split],
            image_dir,
            data.num_views,
            build_transform(
                data.image_size, train=is_train, hflip=data.hflip, crop=data.random_crop, jitter=data.intensity_jitter
            ),
            encode=tokenizer.encode_batch,
            max_seq_length=data.max_seq_length,
            image_cache=cache,
            ann_path=ann_path,
            augment_seed=train.seed if is_train else None,
        )

    if data.batch_size % dist_info.world_size:
        raise ConfigError(f"--batch-size {data.batch_size} must be divisible by the {dist_info.world_size} processes")
    train_set = dataset("train", True)
    # The same sampler single-process (one replica) and distributed, so a run's data order
    # depends on the seed and the global batch only.
    # Augmentations are seeded per (epoch, item) and the loader draws its worker seeds from its own
    # generator, not the global RNG: the number of workers and a restart change nothing.
    sampler = EpochSampler(
        DistributedSampler(
            train_set,
            num_replicas=dist_info.world_size,
            rank=dist_info.rank,
            shuffle=True,
            seed=train.seed,
            drop_last=False,
        )
    )
    loader_kw: dict[str, Any] = dict(
        num_workers=data.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=data.num_workers > 0,
        generator=torch.Generator().manual_seed(train.seed),
    )
    train_loader = DataLoader(
        train_set, batch_size=data.batch_size // dist_info.world_size, sampler=sampler, **loader_kw
    )
    eval_loaders = {}
    if dist_info.is_main:
        for split in ("val", "test"):
            eval_loaders[split] = DataLoader(
                dataset(split, False), batch_size=data.batch_size, shuffle=False, **loader_kw
            )

    # ---- model and optimisation ---------------------------------------------------------
    seed_everything(train.seed)
    model = build_model(model_cfg)
    model.visual.grad_checkpoint = train.checkpoint_visual
    if train.init_from:
        ckpt.load_state_into(model, train.init_from)
        log(f"model initialised from {train.init_from}")
    elif trainer_state is None:
        log(model.visual.load_pretrained(train.visual_weights))
    model.to(device)
    if dist_info.world_size > 1 and train.sync_bn and device.type == "cuda" and not train.freeze_bn:
        # before the optimizer and the warm-up take the parameters: the swap makes new BatchNorm modules
        model.visual.use_sync_batchnorm()
    warmup: list[dict[str, float]] = []
    if train.visual_warmup_epochs and trainer_state is None and not train.init_from:
        warmup = _warm_up(
            model, model_cfg, splits["train"], train, train_loader, sampler, dist_info, device, log, progress
        )
        if dist_info.is_main:
            for rec in warmup:
                _append_line(out_dir / LOG, json.dumps(rec))
    ve_params = list(model.visual.parameters())
    if train.lr_ve == 0:
        # a CNN that never moves needs no gradients: the same run without the CNN's backward
        # (BatchNorm still normalises with batch statistics and updates its running ones)
        for p in ve_params:
            p.requires_grad_(False)
        log("visual extractor: frozen (--lr-ve 0), no gradients computed for it")
    ve_ids = {id(p) for p in ve_params}
    ed_params = [p for p in model.parameters() if id(p) not in ve_ids]
    optimizer = torch.optim.Adam(
        [{"params": ve_params, "lr": train.lr_ve}, {"params": ed_params, "lr": train.lr_ed}],
        betas=train.adam_betas,
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
        amsgrad=train.amsgrad,
    )
    if train.init_from:
        _load_optimizer_state(optimizer, train.init_from, log)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, train.step_size, train.gamma)
    net: torch.nn.Module = model
    if dist_info.world_size > 1:
        net = _ddp(model, device)
    run = _Run(
        data,
        train,
        model_cfg,
        dist_info,
        device,
        out_dir,
        ann_path,
        splits,
        tokenizer,
        model,
        net,
        optimizer,
        scheduler,
        sampler,
        train_loader,
        eval_loaders,
        log,
        progress,
        warmup=warmup,
    )
    if trainer_state is not None:
        ckpt.load_state_into(model, last_dir)
        saved_monitor = trainer_state.get("monitor", "BLEU_4")  # cmn < 0.3 always monitored BLEU-4
        if saved_monitor != train.monitor:
            raise ConfigError(
                f"--resume: {last_dir} picked its best epoch by validation {saved_monitor}, this run by "
                f"{train.monitor} (--monitor {saved_monitor} to continue it)"
            )
        try:
            optimizer.load_state_dict(trainer_state["optimizer"])
            scheduler.load_state_dict(trainer_state["scheduler"])
            run.start_epoch = int(trainer_state["epoch"]) + 1
            run.best_score, run.best_epoch = float(trainer_state["best_score"]), int(trainer_state["best_epoch"])
            run.bad_epochs, run.best_val = int(trainer_state["bad_epochs"]), dict(trainer_state["best_val"])
            set_rng_state(trainer_state["rng"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise CheckpointError(
                f"{last_dir}: trainer_state does not fit this run ({type(e).__name__}: {e})"
            ) from None
        if dist_info.is_main:
            run.warmup = _keep_log_until(out_dir / LOG, run.start_epoch - 1)
        log(f"resuming from {last_dir} at epoch {run.start_epoch}")
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"model: {model_cfg.variant} ({n_params / 1e6:.1f}M parameters, {model_cfg.visual_extractor}, "
        f"memory {model_cfg.memory_size}x{model_cfg.d_model} top-{model_cfg.topk}) on {device}"
    )
    return run


def _ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def _warm_up(
    model: torch.nn.Module,
    model_cfg: ModelConfig,
    studies: list,
    train: TrainConfig,
    loader: DataLoader,
    sampler: Any,
    dist_info: DistInfo,
    device: torch.device,
    log: _Log,
    progress: bool,
) -> list[dict[str, float]]:
    """The visual warm-up (:mod:`cmn.warmup`) on the training split, before report training."""
    from cmn.warmup import N_TARGETS, LabelProbe, positives, targets_for, warm_up_visual

    targets = targets_for(studies)
    stated = positives(targets)
    log(
        f"visual warm-up: {train.visual_warmup_epochs} epochs on the CheXpert labels of the training reports "
        f"({', '.join(f'{k} {v}' for k, v in stated.items()) or 'no observation stated'})"
    )
    probe: torch.nn.Module = LabelProbe(
        cast(torch.nn.Module, model.visual), model_cfg.num_views, model_cfg.d_vf, N_TARGETS
    ).to(device)
    if dist_info.world_size > 1:
        probe = _ddp(probe, device)
    return warm_up_visual(
        probe,
        loader,
        sampler,
        targets,
        epochs=train.visual_warmup_epochs,
        lr=train.visual_warmup_lr,
        device=device,
        precision=train.precision,
        log=log,
        progress=(lambda n, desc: _bar(n, desc, True)) if progress and dist_info.is_main else None,
    )


def _load_optimizer_state(optimizer: torch.optim.Optimizer, bundle: str, log) -> None:
    """Adam moments from a bundle that carries them (``cmn-convert --keep-optimizer``); the
    hyperparameters (learning rates, betas, ...) stay this run's."""
    from cmn import checkpoint as ckpt

    saved = ckpt.load_state_tree(bundle, ckpt.OPTIMIZER_STATE)
    if saved is None:
        return
    own = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{bundle}: optimizer state does not fit this model ({e})") from None
    for group, hyper in zip(optimizer.param_groups, own):
        group.update(hyper)
    log(f"optimizer state (Adam moments) loaded from {bundle}")


def _fit(run: _Run, scorer) -> tuple[int, float]:
    """The epoch loop; returns (last epoch run, seconds)."""
    from cmn import checkpoint as ckpt
    from cmn.engine import generate_split, score, train_one_epoch

    train, log = run.train, run.log
    t_start = time.perf_counter()
    epoch = run.start_epoch - 1
    for epoch in range(run.start_epoch, train.epochs + 1):
        run.sampler.set_epoch(epoch)
        bar = _bar(len(run.train_loader), f"epoch {epoch}/{train.epochs}", run.progress and run.dist.is_main)
        stats = train_one_epoch(
            run.net,
            run.train_loader,
            run.optimizer,
            run.device,
            precision=train.precision,
            world_size=run.dist.world_size,
            progress=bar,
            freeze_bn=train.freeze_bn,
        )
        if bar is not None:
            bar.close()
        run.scheduler.step()
        stop = False
        if run.dist.is_main:
            refs, preds = generate_split(run.model, run.eval_loaders["val"], run.tokenizer, run.device, **run.eval_kw)
            val = score(refs, preds, clinical=run.clinical, scorer=scorer)
            seen = _demo_macro_f1(run, preds)  # demo data only: how well reports state the drawn findings
            if val.get(train.monitor, 0.0) > run.best_score:
                run.best_score, run.best_epoch, run.bad_epochs, run.best_val = (
                    val.get(train.monitor, 0.0),
                    epoch,
                    0,
                    val,
                )
                ckpt.save_checkpoint(
                    run.best_dir, run.model, run.tokenizer, run.data_info, meta={"epoch": epoch, "val": val}
                )
            else:
                run.bad_epochs += 1
            stop = run.bad_epochs >= train.early_stop
            state = {
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "epoch": epoch,
                "monitor": train.monitor,
                "best_score": run.best_score,
                "best_epoch": run.best_epoch,
                "bad_epochs": run.bad_epochs,
                "best_val": run.best_val,
                "rng": rng_state(),
            }
            groups = run.optimizer.param_groups
            record = {
                "epoch": epoch,
                **stats,
                "lr_ve": groups[0]["lr"],
                "lr_ed": groups[1]["lr"],
                **{f"val_{k}": v for k, v in val.items()},
                "best_epoch": run.best_epoch,
                **({} if seen is None else {"val_demo_findings_f1": seen}),
            }
            # The log line goes first: an epoch is done once it is logged. A kill before the save
            # below resumes from the previous epoch, and the resumed run drops the later lines.
            _append_line(run.out_dir / LOG, json.dumps(record))
            ckpt.save_checkpoint(
                run.last_dir,
                run.model,
                run.tokenizer,
                run.data_info,
                meta={"epoch": epoch, "val": val},
                trainer_state=state,
            )
            watched = "" if train.monitor == "BLEU_4" else f", {train.monitor} {val.get(train.monitor, 0):.4f}"
            log(
                f"epoch {epoch}: loss {stats['train_loss']:.3f}, {stats['train_tokens_per_s']:.0f} tokens/s, "
                f"val BLEU-4 {val.get('BLEU_4', 0):.4f}{watched} (best {run.best_score:.4f} at epoch {run.best_epoch})"
                + ("" if seen is None else ", findings F1 " + " ".join(f"{v:.2f}" for v in seen.values()))
            )
        if run.dist.world_size > 1:
            flag = torch.tensor([1.0 if stop else 0.0], device=run.device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if stop:
            log(f"early stop: no validation {train.monitor} improvement for {train.early_stop} epochs")
            break
    return epoch, time.perf_counter() - t_start


def _append_line(path: Path, line: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise CMNError(f"{path}: cannot write ({e.strerror or e})") from None


def _keep_log_until(path: Path, last_epoch: int) -> list[dict]:
    """Drop log lines of epochs after ``last_epoch`` (logged, then killed before the save);
    returns the visual warm-up records the log holds (they precede epoch 1 and are kept)."""
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    kept, warmup = [], []
    for ln in lines:
        try:
            record = json.loads(ln)
            if "warmup_epoch" in record:
                warmup.append(record)
                kept.append(ln)
            elif int(record["epoch"]) <= last_epoch:
                kept.append(ln)
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    if len(kept) != len(lines):
        write_atomic(path, "".join(ln + "\n" for ln in kept))
    return warmup


def _test(run: _Run, scorer, epochs_run: int, train_seconds: float) -> dict[str, Any]:
    """Test the best checkpoint and the most-frequent-report baseline; write metrics.json."""
    from cmn import checkpoint as ckpt
    from cmn.engine import generate_split, score
    from cmn.text import clean_report

    ckpt.load_state_into(run.model, run.best_dir)
    refs, preds = generate_split(run.model, run.eval_loaders["test"], run.tokenizer, run.device, **run.eval_kw)
    # Published protocol: references are the vocabulary-mapped targets cut to max_seq_length, as
    # the reference scores them; "_full" scores use the whole cleaned report instead.
    rule = run.tokenizer.dataset
    full_refs = {s.id: clean_report(s.report, rule) for s in run.splits["test"] if s.id in refs}
    baseline_text = most_frequent_report([clean_report(s.report, rule) for s in run.splits["train"]])
    # the baseline goes through the same vocabulary mapping as the model's output
    baseline_text = run.tokenizer.decode(run.tokenizer.encode(baseline_text)[1:])
    baseline_preds = {k: baseline_text for k in refs}
    test = score(refs, preds, clinical=run.clinical, scorer=scorer)
    test.update(_suffixed(score(full_refs, preds, clinical=run.clinical, scorer=scorer), "_full"))
    baseline = score(refs, baseline_preds, clinical=run.clinical, scorer=scorer)
    baseline.update(_suffixed(score(full_refs, baseline_preds, clinical=run.clinical, scorer=scorer), "_full"))
    result = {
        "val": run.best_val,
        "test": test,
        "baseline_test": baseline,
        "best_epoch": run.best_epoch,
        "monitor": run.train.monitor,
        **_demo_findings(run, preds, baseline_preds),
        "epochs_run": epochs_run,
        "train_seconds": round(train_seconds, 1),
        **({"visual_warmup": run.warmup} if run.warmup else {}),
        "data": {**run.data_info, "ann_path": str(run.ann_path), "sizes": {k: len(v) for k, v in run.splits.items()}},
        "model": asdict(run.model_cfg),
        "train": asdict(run.train),
    }
    write_json(run.out_dir / "metrics.json", result)
    with open(run.out_dir / "test_predictions.jsonl", "w", encoding="utf-8") as f:
        for k in refs:
            f.write(
                json.dumps({"id": k, "prediction": preds[k], "reference": refs[k], "reference_full": full_refs[k]})
                + "\n"
            )
    run.log(
        f"test BLEU-4 {test.get('BLEU_4', 0):.4f} (most-frequent-report baseline "
        f"{baseline.get('BLEU_4', 0):.4f}); wrote {run.out_dir / 'metrics.json'}"
    )
    return result


def _demo_macro_f1(run: _Run, preds: dict[str, str]) -> Optional[dict[str, float]]:
    """Demo data: per-finding F1 of the validation reports against the drawn truth (None elsewhere)."""
    if run.data.demo_size is None:
        return None
    from cmn.data.demo import drawn_findings, score_findings
    from cmn.data.demo.findings import FINDINGS

    if run.val_truth is None:
        run.val_truth = drawn_findings(run.ann_path, "val")
    truth = run.val_truth
    ids = [k for k in preds if k in truth]
    scores = score_findings([truth[k] for k in ids], [preds[k] for k in ids])
    return {name: round(cast(float, scores[name]["f1"]), 4) for name in FINDINGS}  # f1 is never None


def _demo_findings(run: _Run, preds: dict[str, str], baseline: dict[str, str]) -> dict[str, Any]:
    """On the built-in demo data the drawn truth is known: per-finding presence F1 and
    laterality of the test reports (and of the baseline's)."""
    if run.data.demo_size is None:
        return {}
    from cmn.data.demo import drawn_findings, score_findings

    truth = drawn_findings(run.ann_path, "test")
    ids = [k for k in preds if k in truth]
    return {
        "demo_findings": score_findings([truth[k] for k in ids], [preds[k] for k in ids]),
        "baseline_demo_findings": score_findings([truth[k] for k in ids], [baseline[k] for k in ids]),
    }


def _suffixed(scores: dict[str, float], suffix: str) -> dict[str, float]:
    return {k + suffix: v for k, v in scores.items()}


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)
