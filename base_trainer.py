"""
BaseTrainer: everything about training that is not the model.

    python train_baseline_gpt2.py --preset tiny                    # one process (CPU, CUDA or MPS)
    torchrun --nproc_per_node=2 train_baseline_gpt2.py --preset tiny --micro-batch-size 4   # DDP: gloo on CPU
                                                                   # (NCCL on GPUs); 2 x 4 x 128 = 1024 tokens/step

One optimizer step consumes --total-batch-size tokens: micro-batches of --micro-batch-size x --seq-len,
accumulated over grad_accum = total / (micro * seq * world_size) micro-steps on each of world_size ranks.
Rank r reads the chunks that one process would read at micro-steps r, r + N, ... so the tokens per step,
and hence the losses, do not depend on N.

A model supplies its loss and hooks (see auto_regressive_model.py); this file owns devices, DDP, gradient
accumulation, the LR schedule, clipping (before the step), evaluation, metrics.jsonl, atomic checkpoints,
exact --resume and Ctrl-C.

What is scored (seed 001, "masked causal language modeling"):
    --loss-on all       every next-token prediction counts (default)
    --loss-on answer    only the answer tokens of question/answer data (synthetic-math, GSM8K-style JSON) and
                        the <|endoftext|> that ends each answer (so the model still learns to stop); the loader's
                        loss mask. Val rows then hold the answer-only "loss" plus "loss_all" (every token) and
                        bpb from loss_all.
    --filler-token T    the token T (one token of the tokenizer, e.g. " blah" with gpt2) is filler: no position
                        attends to it (a key mask, ANDed with the causal mask in scaled_dot_product_attention)
                        and it is never a scored target.
finetune.py and train_mntp.py subclass BaseTrainer (start from a checkpoint, LoRA, another objective).

Step numbering: `step` counts completed optimizer steps. A val row with step s measures the model after s
steps; the train row with step s is the loss of the batch that update s+1 trains on (build-nanogpt's habit).
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing import cli
from plumbing.cli import EXIT_DIVERGED, EXIT_WRITE_FAILED
from plumbing import run_folder
from plumbing import speed
from auto_regressive_model import AutoRegressiveModel, masked_mean, scored_tokens
from checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from base_data_preparer import ensure_prepared, get_tokenizer
from data_file_utils import DataError, check_run_data
from dataloader import TokenDataLoader
from models import ModelConfigError, model_config, model_module
from plumbing import trainer_console
import optim
# The command line (trainer_config.py); build_parser, resolve_config and the presets are also used from here.
from plumbing.trainer_config import (COMMON_DEFAULTS, LOSS_ON, RESUME_MAY_CHANGE, TRAIN_PRESETS,  # noqa: F401
                            add_trainer_arguments, build_parser, resolve_config)



# What save_checkpoint() writes and --resume needs besides the model (a model-only checkpoint lacks it).
RESUME_STATE = ("model_name", "config", "model_extra_state", "optimizer_state", "step", "tokens_seen",
                "loader_state", "rng", "metrics_offset")


class TrainError(Exception):
    """A problem with the command line or the run folder; the message says what to do."""


class Diverged(Exception):
    """The loss or gradient norm became non-finite (or weights about to be saved are): the run stops."""


class PeerFailed(Exception):
    """Raised on ranks other than 0 when rank 0 reported a failure all ranks share (nothing more to print)."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


# ---- the trainer ----------------------------------------------------------------------------

def filler_token_id(tokenizer_name, text):
    """The token id of --filler-token: the string must be exactly one token of the tokenizer."""
    ids = get_tokenizer(tokenizer_name).encode(text, allowed_special="all")
    if len(ids) != 1:
        raise TrainError(f"--filler-token {text!r} is {len(ids)} tokens with the {tokenizer_name} tokenizer; give "
                         f"a string that is exactly one token (e.g. ' blah' with gpt2, one character with bytes)")
    return ids[0]


class TrainingStep(nn.Module):
    """Wraps the model so that DDP's forward (which arms gradient sync) runs the model's own training loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y, loss_mask, step, key_mask=None):
        if key_mask is None:
            return self.model.training_loss(x, y, loss_mask, step)
        # Filler keys masked: only the default training_loss takes them (check_filler_support made sure).
        return self.model.training_loss(x, y, loss_mask, step, key_mask=key_mask)


class BaseTrainer:
    reports_bpb = True  # evaluation rows carry bits per byte (False where "loss" is no language-model loss)

    def entry_point(self):
        """The script that resumes this kind of run (subclasses: finetune.py, train_mntp.py)."""
        return f"train_{self.model_name}.py"

    def __init__(self, model_name, cfg, typed=None):
        self.model_name = model_name
        self.cfg = cfg
        self.typed = typed or {}
        self.speed_info = {}
        self.stop_signal = None
        self.lock = None
        try:
            self.start()
        except BaseException:
            self.close()  # release the run folder (and the process group) of a run refused at the start
            raise

    def start(self):
        """Everything before the first step: devices, the run folder, data, model, optimizer, --resume.
        Nothing in the run folder is written or deleted here: train_loop() does that after the first step
        (take_over_run_folder)."""
        cfg = self.cfg
        self.held_lines = []  # metrics rows kept in memory until the run takes over its folder
        self.setup_distributed()
        self.ckpt_path = os.path.join(cfg["out_dir"], "checkpoint.pt")
        self.metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
        self.lock_run_folder()  # before anything in the folder is read, written or deleted
        self.resume_ckpt = resume_ckpt = self.check_run_folder()
        if resume_ckpt is not None:
            self.adopt_saved_config(resume_ckpt)
        else:
            self.check_lr_schedule()
        self.log(trainer_console.set_cpu_threads(self.cfg, self.device_type, self.world_size))
        self.log(trainer_console.gpu_preset_note(self.cfg, self.device_type))  # before data and model take time
        speed.plan_micro_batch(self)
        self.setup_data()
        self.seed_everything(self.cfg["seed"])  # before the model: --seed decides the initial weights
        self.setup_model()
        self.step = 0
        self.tokens_seen = 0
        speed.choose_for_device(self)  # --micro-batch-size auto: a probe step (RNG and model untouched)
        self.check_eval_splits()
        self.checkpoint_step = None  # the step of the last checkpoint written or resumed from
        self.nonfinite_skipped = 0   # optimizer steps skipped for a non-finite loss or gradient (--skip-nonfinite)
        self.finished = False  # the checkpoint holds the final evaluation (val and test at max_steps)
        if resume_ckpt is not None:
            self.restore(resume_ckpt)
            if self.step > self.cfg["max_steps"] and not self.finished:
                raise TrainError(f"the checkpoint is at step {self.step}, past --max-steps {self.cfg['max_steps']}, "
                                 f"and the run has no final evaluation yet; give --max-steps {self.step} to end it "
                                 f"there, or more to train further")
        speed.setup_compile(self)      # FLOPs per token for MFU, then torch.compile with a warm-up step

    # -- processes and devices --
    def setup_distributed(self):
        self.ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        requested = cli.pick_device(self.cfg["device"])  # UsageError if this machine cannot use it
        self.device_type = requested.split(":")[0]
        # Under torchrun each process takes the GPU of its local rank; one process may name cuda:N.
        self.device = f"cuda:{self.local_rank}" if self.device_type == "cuda" and (
            self.ddp or requested == "cuda") else requested
        if self.device_type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.ddp:
            dist.init_process_group(backend="nccl" if self.device_type == "cuda" else "gloo")
        self.master = self.rank == 0
        # bf16 autocast on CUDA (no loss scaling needed); fp32 elsewhere.
        self.autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16)
                         if self.device_type == "cuda" else contextlib.nullcontext())

    def log(self, *args):
        if self.master and args != (None,):  # None: a helper had nothing to say
            with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) must not stop the final save
                print(*args, flush=True)

    # -- run folder --
    def lock_run_folder(self):
        """One writer per run folder: rank 0 holds a kernel-released lock (run_folder.RunFolderLock); every
        rank learns whether it got it, so none waits for a partner that is leaving."""
        problem = cli.writable_dir_problem(self.cfg["out_dir"])  # also the default and finetune's derived one
        if problem:
            raise TrainError(f"--out-dir: {problem}")
        out, data = os.path.realpath(self.cfg["out_dir"]), os.path.realpath(self.cfg["data_dir"])
        if out == data or out.startswith(data + os.sep):  # a dataset folder's lock is .lock too: it would hang
            raise TrainError(f"--out-dir {self.cfg['out_dir']} is inside --data-dir {self.cfg['data_dir']}, where "
                             f"the prepared datasets live; choose a run folder outside it (default runs/<model>)")
        failure = None
        if self.master:
            try:
                self.lock = run_folder.RunFolderLock(self.cfg["out_dir"]).acquire()
            except (run_folder.RunFolderBusy, run_folder.WriteError) as e:
                failure = e
        if self.ddp and self.all_reduce_mean({"failed": float(failure is not None)})["failed"] > 0:
            if not self.master:
                raise PeerFailed(2)
        if failure is not None:
            raise failure

    def check_run_folder(self):
        """Refuse to clobber a run; return the checkpoint to resume from, if --resume (or --resume auto and
        there is one). A new run needs a folder without run files, or --overwrite and files a run wrote."""
        out_dir = self.cfg["out_dir"]
        has_ckpt = os.path.exists(self.ckpt_path)
        auto = self.cfg["resume"] == "auto"
        if auto:
            self.cfg["resume"] = has_ckpt
            if not has_ckpt:
                self.log(f"--resume auto: no checkpoint in {out_dir}; starting a new run")
        if self.cfg["resume"]:
            if not has_ckpt:
                raise TrainError(f"nothing to resume: no checkpoint.pt in {self.cfg['out_dir']}; "
                                 f"run without --resume to start a new run")
            ckpt = load_checkpoint(self.ckpt_path)
            missing = [key for key in RESUME_STATE if key not in ckpt]
            if missing:  # e.g. convert_hf.py from-hf's output: weights, but no optimizer, data position, RNG
                raise CheckpointError(f"{self.ckpt_path} holds a model but no training state to resume (no "
                                      f"{', '.join(missing)}); fine-tune from it instead: python finetune.py "
                                      f"--checkpoint {self.ckpt_path} --out-dir ANOTHER_FOLDER")
            if ckpt.get("model_name") != self.model_name:
                raise CheckpointError(f"{self.ckpt_path} holds a {ckpt.get('model_name')} run, not "
                                      f"{self.model_name}; resume it with train_{ckpt.get('model_name')}.py")
            made_by = ckpt["config"].get("entry_point", f"train_{self.model_name}.py")
            if made_by != self.entry_point():
                raise TrainError(f"{self.ckpt_path} was written by {made_by}; resume it with "
                                 f"python {made_by} --out-dir {self.cfg['out_dir']} --resume")
            problem = run_folder.metrics_problem(self.metrics_path, ckpt["metrics_offset"])
            if problem:
                raise TrainError(problem)
            return ckpt
        leftover = run_folder.leftover_run_files(out_dir)
        # --overwrite deletes only what a training run wrote: never, e.g., a convert_hf.py export's config.json
        foreign = [name for name in leftover if not self.written_by_a_run(os.path.join(out_dir, name))]
        if foreign:
            raise TrainError(f"{out_dir} holds {' and '.join(foreign)} that no training run wrote (or that cannot "
                             f"be read); a run replaces only its own files: move them away or choose another "
                             f"--out-dir")
        if has_ckpt and not self.cfg["overwrite"]:
            raise TrainError(f"{out_dir} already holds a run (checkpoint.pt); add --resume to "
                             f"continue it, --overwrite to start over, or choose another --out-dir")
        if leftover and not self.cfg["overwrite"]:
            if not auto:  # --resume auto restarts its own attempt that saved no checkpoint (a requeued job)
                raise TrainError(f"{out_dir} holds {' and '.join(leftover)} of a run that saved no checkpoint; "
                                 f"add --overwrite to start over, or choose another --out-dir")
            self.log(f"--resume auto: replacing {' and '.join(leftover)} of the attempt that saved no checkpoint")
        return None

    @staticmethod
    def written_by_a_run(path):
        """True if path is a file a training run writes: a checkpoint with training state (not, e.g., the
        weights-only one convert_hf.py from-hf writes), or a run's metrics.jsonl or config.json."""
        if os.path.basename(path) != "checkpoint.pt":
            return run_folder.written_by_a_run(path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: reads no tensor
        except Exception:  # noqa: BLE001 - unreadable: not known to be a run's, so not deleted
            return False
        return isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT and "optimizer_state" in ckpt

    def adopt_saved_config(self, ckpt):
        saved = {**COMMON_DEFAULTS, **ckpt["config"]}  # runs from before later options had their defaults
        for key, value in self.typed.items():
            name = key[len("model."):] if key.startswith("model.") else key
            saved_value = saved["model_overrides"].get(name) if key.startswith("model.") else saved.get(key)
            if key == "data" and saved_value:  # runs from before --data paths were made absolute
                saved_value = cli.data_spec(saved_value)
            if name not in RESUME_MAY_CHANGE and value != saved_value:
                raise TrainError(f"--{name.replace('_', '-')} {value} differs from the run being resumed "
                                 f"({saved_value}); drop it to resume exactly, or start a new --out-dir")
        for key in RESUME_MAY_CHANGE - {"resume", "overwrite"}:
            if key in self.typed:
                saved[key] = self.typed[key]
        saved["resume"] = True
        self.cfg = saved

    def check_lr_schedule(self):
        """The cosine schedule decays from --lr to --min-lr: a --min-lr above --lr (e.g. --lr 1e-4 with the tiny
        preset's min_lr 3e-4) would make the learning rate rise to min_lr instead."""
        lr, min_lr = self.cfg["lr"], self.cfg["min_lr"]
        if min_lr > lr:
            whose = "" if "min_lr" in self.typed else " (the preset's default)"
            raise TrainError(f"--min-lr {min_lr:g}{whose} is above --lr {lr:g}: the schedule would raise the "
                             f"learning rate instead of decaying it; give --min-lr {lr / 10:g} (or any value <= --lr)")

    # -- data --
    def setup_data(self):
        cfg = self.cfg
        args = dict(data_dir=cfg["data_dir"], max_tokens=cfg["max_tokens"], seed=cfg["data_seed"],
                    run_data_hash=cfg.get("data_hash"))
        if self.master:  # one process prepares, the others wait and then find it ready
            self.dataset_dir = ensure_prepared(cfg["data"], cfg["tokenizer"], **args)
        if self.ddp:
            dist.barrier()
        if not self.master:
            self.dataset_dir = ensure_prepared(cfg["data"], cfg["tokenizer"], quiet=True, **args)
        cfg.update(check_run_data(self.dataset_dir, cfg))  # --resume: same data hash; records budget + hash
        B, T = cfg["micro_batch_size"], cfg["seq_len"]
        if min(B, T, cfg["total_batch_size"], cfg["max_steps"]) < 1:
            raise TrainError("--micro-batch-size, --seq-len, --total-batch-size and --max-steps must be positive")
        per_micro_step = B * T * self.world_size
        if cfg["total_batch_size"] % per_micro_step:
            fit = cfg["total_batch_size"] // (T * self.world_size)  # a micro batch that fits, if any
            fits = fit and fit * T * self.world_size == cfg["total_batch_size"]
            hint = f"; e.g. --micro-batch-size {fit}" if fits else ""
            raise TrainError(f"--total-batch-size {cfg['total_batch_size']} is not a multiple of micro batch x "
                             f"seq len x processes = {B} x {T} x {self.world_size} = {per_micro_step}{hint}")
        self.grad_accum = cfg["total_batch_size"] // per_micro_step
        if cfg["loss_on"] not in LOSS_ON:
            raise TrainError(f"--loss-on must be one of {', '.join(LOSS_ON)}, not {cfg['loss_on']!r}")
        self.with_loss_mask = cfg["loss_on"] == "answer"
        self.filler_id = filler_token_id(cfg["tokenizer"], cfg["filler_token"]) if cfg["filler_token"] else None
        self.target_offset = self.planned_target_offset()
        self.train_loader = speed.Prefetcher(self.make_loader("train"))  # reads one batch ahead

    def planned_target_offset(self):
        """How far ahead the targets are: the model's config decides (conv_attention can predict 64 ahead)."""
        planned = model_config(self.model_name, self.cfg["preset"], **self.cfg["model_overrides"])
        return getattr(planned, "target_offset", 1)

    def make_loader(self, split, batch_size=None):
        return TokenDataLoader(self.dataset_dir, split, batch_size or self.cfg["micro_batch_size"],
                               self.cfg["seq_len"], self.rank, self.world_size, self.target_offset,
                               with_loss_mask=self.with_loss_mask, device=self.device, score_answer_end=True)

    def eval_loader(self, split, batch_size=None):
        return self.make_loader(split, batch_size)

    def check_eval_splits(self):
        """val is read at every --eval-interval and test only at the end: a split too small for one evaluation
        batch must stop the run here, before any step (and before --overwrite clears the old run)."""
        rows, _ = speed.eval_batches(self.cfg, self.world_size)
        for split in ("val", "test"):
            self.eval_loader(split, rows)  # DataError, one line, if the split cannot fill a batch

    def next_batch(self, loader):
        """(x, y, loss_mask or None, key_mask or None): the answer mask with --loss-on answer; with
        --filler-token, filler keys are masked (key_mask False) and filler targets are not scored."""
        x, y, *rest = loader.next_batch()
        loss_mask, key_mask = (rest[0] if rest else None), None
        if self.filler_id is not None:
            key_mask = x != self.filler_id
            scored = (y != self.filler_id).float()
            loss_mask = scored if loss_mask is None else loss_mask * scored
        return x, y, loss_mask, key_mask

    # -- model and optimizer --
    def setup_model(self):
        cfg, module = self.cfg, model_module(self.model_name)
        extra = getattr(module, "EXTRA_TOKENS", 0)
        vocab_size = -(-(self.train_loader.vocab_size + extra) // 64) * 64  # round up: faster matmuls
        overrides = dict(cfg["model_overrides"], vocab_size=vocab_size, block_size=cfg["seq_len"])
        self.model_cfg = model_config(self.model_name, cfg["preset"], **overrides)
        self.check_model_fits(module.Model, self.model_cfg)  # sizes checked before any memory is taken
        self.model = module.Model(self.model_cfg).to(self.device)
        self.check_filler_support()
        self.optimizer = None
        self.build_optimizer()

    def check_model_fits(self, model_class, model_cfg):
        """Build the model on the meta device (shapes, no memory: the model's own size checks run) in the state
        that needs the most memory, and refuse it if its weights, gradients and AdamW moments (16 bytes per
        parameter) exceed this device's memory: one line now rather than an out-of-memory kill later."""
        with torch.device("meta"):
            model = model_class(model_cfg).memory_probe_model()
        n = sum(p.numel() for p in model.parameters())
        processes = self.world_size if self.device_type == "cpu" else 1  # CPU ranks share the machine's memory
        need, have = 16 * n * processes, device_memory(self.device)
        if have and need > have:
            sizes = ", ".join(f"{k} {v}" for k, v in dataclasses.asdict(model_cfg).items()
                              if k.startswith("n_") or k in ("block_size", "vocab_size"))
            raise TrainError(f"the model has {n:,} parameters: training it needs about {need / 2**30:,.1f} GiB (16 "
                             f"bytes per parameter{' x %d processes' % processes if processes > 1 else ''}), more "
                             f"than the {have / 2**30:,.1f} GiB of {self.device}; choose smaller sizes ({sizes})")

    def check_filler_support(self):
        """--filler-token needs a model that takes a key mask and trains with the plain next-token loss."""
        if self.filler_id is None:
            return
        if type(self.model).training_loss is not AutoRegressiveModel.training_loss:
            raise TrainError(f"--filler-token is not supported by {self.model.name}: it has its own training loss")
        try:
            with torch.no_grad():
                probe = torch.zeros(1, 2, dtype=torch.long, device=self.device)
                self.model(probe, key_mask=torch.ones_like(probe, dtype=torch.bool))
        except (TypeError, ValueError) as e:
            raise TrainError(f"--filler-token is not supported by {self.model.name} ({str(e).splitlines()[0]})") \
                from None

    def build_optimizer(self):
        """--optimizer (optim.py: AdamW, or Muon + AdamW) over exactly the trainable parameters.
        Called again when a model hook changes which parameters train: optimizer state carries over for
        parameters that stay, and a copied parameter starts from its source's (optim.carry_optimizer_state)."""
        new = optim.build_optimizer(self.model, self.cfg, fused=self.device_type == "cuda")
        if self.optimizer is not None:
            optim.carry_optimizer_state(self.optimizer, new, getattr(self.model, "parameter_origins", {}))
        self.optimizer = new
        self.step_module = self.make_step_module()
        if self.ddp:
            self.step_module = DDP(self.step_module, device_ids=[self.local_rank] if self.device_type == "cuda"
                                   else None)

    def make_step_module(self):
        """The module whose forward returns (loss, metrics) of one micro-batch (DDP wraps it)."""
        return TrainingStep(self.model)

    def lr_at(self, step):
        """Linear warmup, then cosine decay from lr to min_lr at max_steps."""
        cfg = self.cfg
        if step < cfg["warmup_steps"]:
            return cfg["lr"] * (step + 1) / cfg["warmup_steps"]
        span = max(1, cfg["max_steps"] - cfg["warmup_steps"])
        progress = min(1.0, (step - cfg["warmup_steps"]) / span)
        return cfg["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg["lr"] - cfg["min_lr"])

    # -- randomness --
    @staticmethod
    def seed_everything(seed):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    @staticmethod
    def rng_state():
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if torch.backends.mps.is_available():
            state["mps"] = torch.mps.get_rng_state()
        return state

    @staticmethod
    def set_rng_state(state):
        random.setstate(state["python"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if "mps" in state and torch.backends.mps.is_available():
            torch.mps.set_rng_state(state["mps"])

    # -- checkpoints --
    def save_checkpoint(self, finished=False):
        """Write checkpoint.pt atomically: a temporary file, fsync, then rename over the old one. Weights that
        are not finite are never saved (every rank checks its identical copy, so all stop together).
        finished: the final checkpoint, after the val and test evaluation at max_steps."""
        if not all_finite(self.model.parameters()):
            if not self.master:
                raise PeerFailed(EXIT_DIVERGED)
            raise Diverged(f"step {self.step}: the weights are not finite; not saving them over "
                           f"{self.last_good_checkpoint()}. {self.what_to_try()}")
        if not self.master:
            return
        self.take_over_run_folder()  # a checkpoint before the first step (a signal): the folder is the run's now
        ckpt = {
            "format": CHECKPOINT_FORMAT, "model_name": self.model_name,
            "model_config": dataclasses.asdict(self.model_cfg), **self.model_states(),
            "model_extra_state": self.model.extra_state(), "optimizer_state": self.optimizer.state_dict(),
            "step": self.step, "tokens_seen": self.tokens_seen, "loader_state": self.train_loader.state_dict(),
            "rng": self.rng_state(), "config": self.cfg, "metrics_offset": self.metrics_offset(),
            "nonfinite_skipped": self.nonfinite_skipped, "finished": finished,
        }
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        data = buffer.getvalue()
        if fault("kill_in_checkpoint", self.step):  # test hook: die with half a file written
            with open(self.ckpt_path + ".tmp", "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        run_folder.atomic_write(self.ckpt_path, data)  # WriteError (one line) leaves the old checkpoint
        self.checkpoint_step = self.step

    def last_good_checkpoint(self):
        if self.held_lines is not None and not self.cfg["resume"]:
            return f"{self.cfg['out_dir']} as it was (this run wrote nothing there)"
        if self.checkpoint_step is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint (step {self.checkpoint_step}, {self.ckpt_path})"

    def what_to_try(self):
        return (f"Try a lower --lr (now {self.cfg['lr']:g}) or --grad-clip (now {self.cfg['grad_clip']:g}) in a "
                f"new run (--overwrite or another --out-dir), or --skip-nonfinite N to skip rare bad batches")

    def model_states(self):
        """The weights a checkpoint stores. "model_state" is what from_checkpoint() loads; a subclass that
        trains another structure (LoRA) adds "train_model_state", which --resume loads instead."""
        return {"model_state": self.model.state_dict()}

    def restore(self, ckpt):
        self.model.load_extra_state(ckpt["model_extra_state"])
        try:
            self.model.load_state_dict(ckpt.get("train_model_state", ckpt["model_state"]))
        except RuntimeError as e:
            raise CheckpointError(f"{self.ckpt_path} does not fit this model: {str(e).splitlines()[0]}") from None
        self.optimizer = None
        self.build_optimizer()  # the stage may have changed the trainable set
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        # Saving refuses non-finite weights, but a checkpoint from elsewhere (or older code) may hold them: it
        # would only diverge again, so say so now instead of calling it a good checkpoint later.
        if not all_finite([*self.model.state_dict().values(), *tensors_in(self.optimizer.state_dict())]):
            raise CheckpointError(f"{self.ckpt_path} (step {ckpt['step']}) holds non-finite weights or optimizer "
                                  f"state, so it cannot be resumed; start over with --overwrite (or from a copy of an "
                                  f"earlier checkpoint)")
        self.train_loader.load_state_dict(ckpt["loader_state"])
        self.set_rng_state(ckpt["rng"])
        self.step, self.tokens_seen = ckpt["step"], ckpt["tokens_seen"]
        self.checkpoint_step, self.nonfinite_skipped = ckpt["step"], ckpt.get("nonfinite_skipped", 0)
        self.metrics_kept = ckpt["metrics_offset"]  # train() drops the rows logged after the checkpoint
        # Checkpoints from before "finished" existed: the final one is the one at the run's own max_steps.
        self.finished = ckpt.get("finished", ckpt["step"] >= ckpt["config"]["max_steps"])

    # -- metrics --
    def metrics_offset(self):
        return os.path.getsize(self.metrics_path) if os.path.exists(self.metrics_path) else 0

    def write_metrics(self, row):
        if self.master:
            line = json.dumps({**row, **self.model.log_fields()}) + "\n"
            if self.held_lines is not None:  # the folder is not the run's yet (take_over_run_folder)
                self.held_lines.append(line)
            else:
                run_folder.append_line(self.metrics_path, line)

    def write_config(self):
        if not self.master:
            return
        resolved = dict(self.cfg, model_config=dataclasses.asdict(self.model_cfg), world_size=self.world_size,
                        grad_accum=self.grad_accum, dataset_dir=str(self.dataset_dir),
                        n_params=self.model.num_params(), device_used=self.device, **self.speed_info)
        run_folder.atomic_write(os.path.join(self.cfg["out_dir"], "config.json"),
                                json.dumps(resolved, indent=2).encode())

    def all_reduce_mean(self, values):
        """Average a dict of floats over the ranks (identity with one process)."""
        if not self.ddp or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.AVG if self.device_type == "cuda" else dist.ReduceOp.SUM)
        if self.device_type != "cuda":  # gloo has no AVG
            t /= self.world_size
        return dict(zip(keys, t.tolist()))

    # -- evaluation and training --
    def evaluation_losses(self, x, y, loss_mask, key_mask):
        """{"loss": ..., ...} of one batch. With a loss mask, "loss" is what training scores and "loss_all"
        the loss over every (non-filler) token, from which bits per byte are computed."""
        if type(self.model).evaluation_losses is not AutoRegressiveModel.evaluation_losses:
            out = dict(self.model.evaluation_losses(x, y, loss_mask))  # a model's own (e.g. per direction)
            if loss_mask is not None:
                out["loss_all"] = self.model.evaluation_losses(x, y, None)["loss"]
            return out
        losses, _ = self.model.lm_token_losses(x, y, key_mask=key_mask)  # one forward for both losses, chunked
        out = {"loss": masked_mean(losses, y, loss_mask)}
        if self.with_loss_mask:
            scored = None if self.filler_id is None else (y != self.filler_id).float()
            out["loss_all"] = masked_mean(losses, y, scored)
        return out

    @torch.no_grad()
    def evaluate(self, split):
        self.model.eval()
        rows, batches = speed.eval_batches(self.cfg, self.world_size)  # the same tokens at any micro batch
        loader = self.eval_loader(split, rows)
        sums = {}
        for _ in range(batches):
            x, y, loss_mask, key_mask = self.next_batch(loader)
            speed.begin_micro_step(self)
            with self.autocast:
                losses = self.evaluation_losses(x, y, loss_mask, key_mask)
            # Each figure is a mean over tokens, not over batches: a batch's mean weighs as many tokens as it
            # scored (with a loss mask a batch may score few answer tokens, or none). "loss_all" scores every
            # non-filler token, the rest what the loss mask scores.
            scored = scored_tokens(y, loss_mask)
            scored_all = scored_tokens(y, None if self.filler_id is None else (y != self.filler_id).float())
            for k, v in losses.items():  # summed on the device: one sync per evaluation
                n = scored_all if k == "loss_all" else scored
                sums[k] = sums.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) * n
                sums[f"{k} tokens"] = sums.get(f"{k} tokens", 0.0) + n
        self.model.train()
        sums = self.all_reduce_mean(speed.to_floats(sums))  # the ranks' means of sums and counts: same ratio
        result = {k: sums[k] / max(1.0, sums[f"{k} tokens"]) for k in losses}
        # Bits per byte: tokenizer-independent, so byte-level and BPE runs compare.
        if self.reports_bpb:
            result["bpb"] = result.get("loss_all", result["loss"]) / math.log(2) * loader.tokens / max(1, loader.bytes)
        row = {"step": self.step, "split": split, **result, "tokens": self.tokens_seen}
        self.write_metrics(row)
        extras = " | ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "loss")
        self.log(f"step {self.step:5d} | {split} loss {result['loss']:.4f} | {extras}")
        return result

    def train_step(self):
        cfg = self.cfg
        if self.model.on_train_step(self.step, cfg["max_steps"]):
            self.build_optimizer()
            self.log(f"step {self.step:5d} | trainable parameters changed: "
                     f"{self.model.num_params(trainable_only=True):,} now train; optimizer rebuilt")
        t0 = time.time()
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's group: --muon-lr / --lr
        self.optimizer.zero_grad(set_to_none=True)
        totals, loss_sum = {}, 0.0
        # With a loss mask the weights need every micro-batch's scored tokens first; without one, each batch is
        # read when its turn comes (the prefetcher's copy of the next overlaps the GPU's work on this one).
        masked = self.with_loss_mask or self.filler_id is not None
        batches = [self.next_batch(self.train_loader) for _ in range(self.grad_accum)] if masked else None
        weights = self.micro_weights(batches) if masked else [1.0 / self.grad_accum] * self.grad_accum
        for micro_step, weight in enumerate(weights):
            x, y, loss_mask, key_mask = batches[micro_step] if masked else self.next_batch(self.train_loader)
            last = micro_step == self.grad_accum - 1
            # Gradients are summed across ranks only on the last micro-step: one all-reduce per step.
            sync = self.step_module.no_sync() if (self.ddp and not last) else contextlib.nullcontext()
            speed.begin_micro_step(self)
            with sync:
                with self.autocast:
                    loss, metrics = self.step_module(x, y, loss_mask, self.step, key_mask)
                (loss * weight).backward()
            # No .item() here: a GPU sync per micro-step stalls the queue; metrics stay on the device too.
            loss_sum = loss_sum + loss.detach() * weight
            if fault("nan_loss", self.step) and not self.nonfinite_skipped:  # test hook: one NaN step
                loss_sum = loss_sum * float("nan")
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + (v.detach() if torch.is_tensor(v) else v) * weight
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])  # clip first, then step
        # The step's one host sync, before the update: every number of the row in one copy. The loss is then
        # averaged over the ranks and the norm is of the all-reduced gradients, so every rank decides alike.
        totals = speed.to_floats({"loss": loss_sum, **totals, "grad_norm": grad_norm})
        grad_norm = totals.pop("grad_norm")
        totals = self.all_reduce_mean(dict(totals, grad_norm_finite=float(math.isfinite(grad_norm))))
        finite_norm = totals.pop("grad_norm_finite") == 1.0
        if not (math.isfinite(totals["loss"]) and finite_norm):
            return self.nonfinite_step(totals["loss"], grad_norm)  # the update is not applied
        self.optimizer.step()
        if self.device_type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        tokens = cfg["total_batch_size"]
        self.tokens_seen += tokens
        row = {"step": self.step, "split": "train", **totals, "lr": lr, "grad_norm": grad_norm,
               "tokens": self.tokens_seen, "dt_ms": dt * 1000, "tok_per_s": tokens / dt,
               **speed.train_row_speed(self, tokens / dt)}
        self.write_metrics(row)
        self.step += 1
        return row

    def micro_weights(self, batches):
        """The weight of each micro-batch's (mean) loss in the step, so that the gradient, and the logged loss, are
        the mean over every scored token of the optimizer step (all micro-steps, all ranks), as one large batch
        would give. Without a loss mask every micro-batch scores B x T tokens: 1 / grad_accum each. With one
        (--loss-on answer, --filler-token) micro-batches score different numbers of tokens, and an equal weight
        would count a token of a sparse micro-batch more (one with none would add a loss of 0). So micro-batch
        i weighs n_i / N, N the scored tokens of the whole step, times world_size (DDP averages the ranks'
        gradients); the ranks' mean of the logged figures is then the token mean too."""
        counts = [scored_tokens(y, loss_mask) for _, y, loss_mask, _ in batches]
        total = torch.stack(counts).sum()
        if self.ddp:
            dist.all_reduce(total)  # SUM: the scored tokens of the step on every rank
        return [n * self.world_size / total.clamp(min=1.0) for n in counts]

    def nonfinite_step(self, loss, grad_norm):
        """A step whose loss or gradient norm is not finite: skip it (--skip-nonfinite N, at most N times per run;
        the batch is consumed, the step count stays) or stop with Diverged. The weights were not touched."""
        bad = f"the loss is {loss:g}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm:g}"
        skip = self.nonfinite_skipped < self.cfg["skip_nonfinite"]
        self.write_metrics({"step": self.step, "split": "nonfinite", "loss": None, "problem": bad,
                            "action": "skipped" if skip else "stopped", "tokens": self.tokens_seen})
        if not skip:
            if not self.master:  # rank 0 says why
                raise PeerFailed(EXIT_DIVERGED)
            raise Diverged(f"step {self.step}: {bad}; the update was not applied and the run stops here. "
                           f"Kept: {self.last_good_checkpoint()}. {self.what_to_try()}")
        self.nonfinite_skipped += 1
        self.tokens_seen += self.cfg["total_batch_size"]
        self.log(f"step {self.step:5d} | {bad}: step skipped ({self.nonfinite_skipped} of --skip-nonfinite "
                 f"{self.cfg['skip_nonfinite']})")
        return None

    def request_stop(self, signum, frame):
        """SIGINT (Ctrl-C), SIGTERM (kill, schedulers) and SIGHUP (closed terminal or ssh session): save a
        checkpoint after this step and exit with 128 + the signal's number."""
        if self.stop_signal is not None:  # a second signal stops at once
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.stop_signal = signum
        self.log(f"\nstopping ({signal.Signals(signum).name}): saving a checkpoint after this step (Ctrl-C again "
                 f"to quit without saving)")

    def should_stop(self):
        """0 to go on, else the exit code: 128 + the signal any rank received (the largest, if several)."""
        code = 128 + self.stop_signal if self.stop_signal is not None else 0
        if self.ddp:
            t = torch.tensor([code], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        return code

    def train(self):
        """Train to --max-steps (or a signal); returns the exit code. The run folder's lock is held until here."""
        try:
            return self.train_loop()
        finally:
            self.release_run_folder()

    def train_loop(self):
        cfg = self.cfg
        if self.step >= cfg["max_steps"] and self.finished:
            self.log(f"run already finished at step {self.step}; raise --max-steps to train further")
            return
        # An interrupted run resumed with --max-steps at its checkpoint's step: no step, just the final evaluation.
        self.log(f"{self.model_name}: {self.model.num_params():,} parameters | {self.world_size} process(es) on "
                 f"{self.device} | {cfg['total_batch_size']:,} tokens/step = {cfg['micro_batch_size']} x "
                 f"{cfg['seq_len']} x {self.grad_accum} accum x {self.world_size} | data {self.dataset_dir}")
        self.log(speed.describe_speed(self))
        if cfg["resume"]:
            self.log(f"resuming at step {self.step} from {self.ckpt_path}")
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self.request_stop)
        dts, evaluated = [], (self.step if self.finished else None)  # a finished run has its val row at this step
        while self.step < cfg["max_steps"]:
            if self.step % cfg["eval_interval"] == 0 and evaluated != self.step:
                self.evaluate("val")
                evaluated = self.step
            row = self.train_step()
            self.take_over_run_folder()  # after the first step: nothing before it touched the folder
            if row is not None:  # None: a non-finite step was skipped (--skip-nonfinite), the step count stays
                dts.append(row["dt_ms"])
                eta = trainer_console.eta_seconds(dts, cfg["max_steps"] - self.step)
                self.log(f"step {row['step']:5d} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | norm "
                         f"{row['grad_norm']:.2f} | {row['dt_ms']:.0f} ms | {row['tok_per_s']:,.0f} tok/s | "
                         f"{'MFU {:.1%} | '.format(row['mfu']) if 'mfu' in row else ''}"
                         f"eta {eta // 60:.0f}m{eta % 60:02.0f}s")
                if len(dts) == 1:
                    self.log(trainer_console.gpu_preset_estimate(cfg, self.device_type, dts[0], eta))
                if self.step % cfg["checkpoint_interval"] == 0 and self.step < cfg["max_steps"]:
                    self.save_checkpoint()
                if fault("kill_after_step", self.step):  # test hook: die like kill -9
                    os.kill(os.getpid(), signal.SIGKILL)
            code = self.should_stop()
            if code:
                self.save_checkpoint()
                self.log(f"interrupted: checkpoint saved at step {self.step} in {self.ckpt_path}; "
                         f"continue with --resume")
                return code
        self.evaluate("val")
        self.evaluate("test")
        self.save_checkpoint(finished=True)
        self.log(f"done: {self.step} steps; checkpoint in {self.ckpt_path}")
        return 0

    def take_over_run_folder(self):
        """Make the run folder this run's, once: clear the old run (a new run; --overwrite), or drop the rows the
        interrupted process logged after its checkpoint (--resume); then write config.json and the metrics rows
        held back so far. Called after the first step (or by the first checkpoint), not at the start: the checks
        at the start cannot foresee everything that fails only when the model first runs (a layer of width 0,
        threads the machine cannot start, an optimizer overflow, a crash or an out-of-memory kill), and whatever
        happens before this point leaves the folder byte for byte as the command found it."""
        if self.held_lines is None:
            return
        if self.master:
            out_dir = self.cfg["out_dir"]
            run_folder.remove_stale_temporaries(out_dir)  # only our own *.tmp names (run_folder.TEMPORARIES)
            if self.cfg["resume"] and os.path.exists(self.metrics_path):
                # check_run_folder made sure the file is not shorter than the checkpoint says
                os.truncate(self.metrics_path, self.metrics_kept)
            elif not self.cfg["resume"]:
                run_folder.clear_run_files(out_dir)  # check_run_folder: only files a run wrote, --overwrite given
        lines, self.held_lines = self.held_lines, None
        self.write_config()
        for line in lines:
            run_folder.append_line(self.metrics_path, line)

    def release_run_folder(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def close(self, finished=False):
        """Release the run folder and leave the process group. finished: every rank got here the same way (the
        loop ended or all stopped on a signal), so a barrier is safe; it keeps a rank from leaving while rank 0
        still writes the last checkpoint. After an error on one rank only, a barrier could wait forever."""
        self.release_run_folder()
        if self.ddp and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def device_memory(device):
    """Bytes of memory on `device` (a CUDA GPU's, else this machine's RAM), or None if unknown."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def tensors_in(value):
    """Every tensor inside nested dicts, lists and tuples (an optimizer's state_dict)."""
    if torch.is_tensor(value):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [t for item in items for t in tensors_in(item)]


def all_finite(tensors):
    """True if every element of every tensor is finite (one host sync)."""
    flags = [t.detach().isfinite().all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def fault(kind, step):
    """Fault injection for the tests: LMSMALL_FAULT=kind:step makes the process die at that point."""
    return os.environ.get("LMSMALL_FAULT") == f"{kind}:{step}"


def run(trainer_class, resolve, argv=None):
    """Build and train; bad input ends with one line on stderr and exit code 2. resolve(argv) returns
    (model_name, cfg, typed). Shared by train_<model>.py, finetune.py and train_mntp.py."""
    trainer, finished = None, False
    try:
        model_name, cfg, typed = resolve(argv)
        trainer = trainer_class(model_name, cfg, typed)
        code = trainer.train() or 0
        finished = True
    except (TrainError, DataError, CheckpointError, ModelConfigError, cli.UsageError,
            run_folder.RunFolderBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except run_folder.WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_WRITE_FAILED
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_DIVERGED
    except PeerFailed as e:  # rank 0 printed the reason
        code = e.code
    except KeyboardInterrupt:
        print("interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        code = 130
    finally:
        if trainer is not None:
            trainer.close(finished)
    if dist.is_available() and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        # Under torchrun, end here. The gloo process group outlives destroy_process_group() (C++ keeps
        # references; its worker threads keep running), so a normal exit destroys it during interpreter and
        # static teardown, racing those threads: ~1 in 10 two-process runs aborted there with "terminate called
        # without an active exception" and torchrun reported FAILED. Every file of the run is already written
        # and closed (atomic_write, append_line), so only stdout and stderr need flushing.
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return code


def main(model_name, argv=None):
    """Entry point of every train_<model>.py."""
    sys.exit(run(BaseTrainer, lambda a: (model_name, *resolve_config(model_name, a)), argv))
